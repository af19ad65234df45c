// Build facts of this library, read from the header the build generates.
#include <pyprune/build_config.h>
#include <pyprune/build_info.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

namespace pyprune {

std::tuple<bool, std::string, std::string, bool> build_info() {
#ifdef PYPRUNE_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                    std::to_string(TORCH_VERSION_MINOR) + "." +
                                    std::to_string(TORCH_VERSION_PATCH);
  return {cuda, PYPRUNE_CUDA_ARCHS, torch_version, openmp};
}

std::string missing_arch_message(int64_t major, int64_t minor, const std::string& gpu_name) {
  const std::string arch = std::to_string(major) + "." + std::to_string(minor);
  const std::string compiled = PYPRUNE_CUDA_ARCHS;
  return "pyprune_ext has no CUDA kernels for this GPU: " + gpu_name + " has compute capability " +
         arch + " (sm_" + std::to_string(major) + std::to_string(minor) +
         "), and this build was compiled for " + (compiled.empty() ? "no CUDA architecture" : compiled) +
         ". Rebuild it for this GPU: TORCH_CUDA_ARCH_LIST=\"" + arch +
         "\" pip install --no-build-isolation --force-reinstall . (from the source folder; or "
         "TORCH_CUDA_ARCH_LIST=\"" + arch + "\" bash scripts/setup.sh), or leave TORCH_CUDA_ARCH_LIST "
         "unset on a machine with this GPU to build for the GPUs it sees.";
}

}  // namespace pyprune
