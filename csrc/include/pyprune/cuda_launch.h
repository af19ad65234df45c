// The check after every kernel launch of this library. It replaces
// C10_CUDA_KERNEL_LAUNCH_CHECK() so that a GPU whose architecture was not
// compiled in gets an error naming its architecture, the compiled ones and how
// to rebuild, instead of CUDA's "no kernel image is available".
#pragma once

#include <pyprune/build_info.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace pyprune {

inline void throw_if_arch_missing(cudaError_t err) {
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, missing_arch_message(prop->major, prop->minor, prop->name));
  }
}

}  // namespace pyprune

#define PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK()                   \
  do {                                                       \
    const cudaError_t pyprune_launch_error = cudaGetLastError(); \
    ::pyprune::throw_if_arch_missing(pyprune_launch_error);  \
    C10_CUDA_CHECK(pyprune_launch_error);                    \
  } while (0)
