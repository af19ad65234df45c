"""Build of pyprune_ext._C: a CUDA extension when the installed torch has CUDA and
nvcc is found (a GPU need not be attached), a CPU-only extension otherwise.

Environment:
  PYPRUNE_CUDA=1          fail unless the CUDA kernels can be built
  PYPRUNE_CUDA=0          build the CPU kernels only
  TORCH_CUDA_ARCH_LIST    target GPU architectures; default "8.0;9.0" when no GPU
                          is visible, else the visible GPUs' own
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists
  MAX_JOBS                parallel compile jobs (ninja)

Install without build isolation, against the torch you already have:
  pip install --no-build-isolation -e .
"""

import glob
import os
import sys

# torch guesses the toolkit from the location of `nvcc` on PATH, which may be a
# wrapper script outside the toolkit: point it at the real one before import.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def cuda_build_wanted() -> bool:
    """Decide between the CUDA and the CPU-only build (PYPRUNE_CUDA overrides)."""
    request = os.environ.get("PYPRUNE_CUDA", "").strip()
    if request not in ("", "0", "1"):
        sys.exit(f"PYPRUNE_CUDA must be 0 or 1, got {request!r}")
    if request == "0":
        return False
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if not nvcc:
        problems.append("nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    if problems and request == "1":
        sys.exit("PYPRUNE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems


def cuda_arch_list() -> str:
    """The architectures nvcc compiles for; fixed here so that it can be recorded."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            archs = DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def pip_cuda_include_dirs() -> list:
    """The pip CUDA wheels keep cuBLAS/cuSPARSE headers beside torch; ATen's
    CUDA headers include them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return [d for d in found if os.path.isdir(d)]


def write_build_config(with_cuda: bool, archs: str) -> None:
    """Record the build's torch version so that import can explain a mismatch."""
    path = os.path.join(ROOT, "pyprune_ext", "_build_config.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {archs!r}\n"
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_extension():
    with_cuda = cuda_build_wanted()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]
    if not with_cuda:
        write_build_config(False, "")
        return cpp_extension.CppExtension(
            "pyprune_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    archs = cuda_arch_list()
    write_build_config(True, archs)
    # Commas instead of semicolons: the value passes through a shell (ninja).
    defines = ["-DPYPRUNE_WITH_CUDA", "-DPYPRUNE_CUDA_ARCHS=" + archs.replace(";", ",").replace(" ", ",")]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--threads", "2"] + defines
    return cpp_extension.CUDAExtension(
        "pyprune_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["pyprune_ext", "pyprune_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
