"""Build of pyprune_ext._C: a CUDA extension when the installed torch has CUDA and
nvcc is found (a GPU need not be attached), a CPU-only extension otherwise.

Environment:
  PYPRUNE_CUDA=1          fail unless the CUDA kernels can be built
  PYPRUNE_CUDA=0          build the CPU kernels only
  TORCH_CUDA_ARCH_LIST    target GPU architectures, as torch reads them ("8.0;9.0",
                          "8.0 9.0", "9.0+PTX", "9.0a", "Hopper"); default: the
                          visible GPUs' own, or "8.0;9.0" when no GPU is visible
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists
  MAX_JOBS                parallel compile jobs (ninja)

Build against the torch you already have, without build isolation:
  pip install --no-build-isolation .
"""

import glob
import os
import re
import sys

# torch guesses the toolkit from the location of `nvcc` on PATH, which may be a
# wrapper script outside the toolkit: point it at the real one before import.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
except ImportError:
    # Under pip's build isolation torch is not importable here (it is not a
    # build requirement on purpose: pip would build against a second torch).
    sys.exit("pyprune_ext is compiled against the torch it will run with, and none is importable "
             "here: install torch first, then build without build isolation: "
             "pip install --no-build-isolation .")
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"
# The C++ side reads what was built from a header generated here (and by CMake)
# from one template: a list passed as a -D value would be split by nvcc at commas.
BUILD_CONFIG_TEMPLATE = os.path.join(ROOT, "csrc", "include", "pyprune", "build_config.h.in")
GENERATED_INCLUDE_DIR = os.path.join(ROOT, "build", "generated")
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--threads", "2"]


def say(line: str) -> None:
    print(f"pyprune_ext: {line}", file=sys.stderr, flush=True)


def cuda_build_problems() -> list:
    """Why the CUDA kernels cannot be built here (empty when they can)."""
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is a CPU-only build")
    home = cpp_extension.CUDA_HOME
    if not (home and os.path.exists(os.path.join(home, "bin", "nvcc"))):
        problems.append("nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    return problems


def cuda_build_choice() -> tuple:
    """(build the CUDA kernels?, why not): PYPRUNE_CUDA overrides the detection."""
    request = os.environ.get("PYPRUNE_CUDA", "").strip()
    if request not in ("", "0", "1"):
        sys.exit(f"pyprune_ext: PYPRUNE_CUDA must be 0 or 1, got {request!r}")
    if request == "0":
        return False, "PYPRUNE_CUDA=0"
    problems = cuda_build_problems()
    if problems and request == "1":
        sys.exit("pyprune_ext: PYPRUNE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems, "; ".join(problems)


def requested_arch_list(environ=os.environ) -> str:
    """TORCH_CUDA_ARCH_LIST with its separators normalised to single ';' (torch
    rejects the empty entries of "8.0;;9.0" or a trailing ';'); when unset, the
    visible GPUs' architectures, or DEFAULT_ARCH_LIST without a GPU."""
    entries = [e for e in re.split(r"[;,\s]+", environ.get("TORCH_CUDA_ARCH_LIST", "")) if e]
    if entries:
        return ";".join(entries)
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH_LIST


def arch_flags(arch_list: str) -> list:
    """nvcc's -gencode flags for an arch list, by torch's own parser (which
    expands named architectures and refuses unknown ones with ValueError)."""
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension._get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def compiled_archs(flags: list) -> str:
    """What torch's -gencode flags put in the binary, as "8.0;9.0+PTX": an entry
    per architecture (torch always emits its sm_ binary), "+PTX" where its PTX
    is embedded too."""
    binaries, ptx = set(), set()
    for flag in flags:
        match = re.fullmatch(r"-gencode=arch=compute_(\d+)([a-z]?),code=(sm|compute)_\d+[a-z]?", flag)
        if not match:
            raise ValueError(f"unexpected nvcc architecture flag {flag!r}")
        key = (int(match.group(1)[:-1]), int(match.group(1)[-1]), match.group(2))
        (binaries if match.group(3) == "sm" else ptx).add(key)
    return ";".join(f"{major}.{minor}{suffix}" + ("+PTX" if (major, minor, suffix) in ptx else "")
                    for major, minor, suffix in sorted(binaries))


def write_if_changed(path: str, text: str) -> None:
    """Atomic, and skipped when the content is the same: a new mtime on the
    generated header would make ninja recompile every source."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_config_header(archs: str) -> str:
    with open(BUILD_CONFIG_TEMPLATE) as f:
        return f.read().replace("@PYPRUNE_CUDA_ARCHS@", archs)


def write_build_config(with_cuda: bool, archs: str, cpu_only_reason: str) -> None:
    """Records the build for the C++ side (the generated header) and for import
    (pyprune_ext/_build_config.py, which explains a torch version mismatch)."""
    write_if_changed(os.path.join(GENERATED_INCLUDE_DIR, "pyprune", "build_config.h"),
                     build_config_header(archs))
    write_if_changed(os.path.join(ROOT, "pyprune_ext", "_build_config.py"), (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {archs!r}\n"
        f"CPU_ONLY_REASON = {cpu_only_reason!r}\n"))


def pip_cuda_include_dirs() -> list:
    """The pip CUDA wheels keep cuBLAS/cuSPARSE headers beside torch; ATen's
    CUDA headers include them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return [d for d in found if os.path.isdir(d)]


def make_extension():
    with_cuda, cpu_only_reason = cuda_build_choice()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), GENERATED_INCLUDE_DIR]
    cxx_flags = ["-O3", "-fopenmp"]
    if not with_cuda:
        say(f"building the CPU kernels only: {cpu_only_reason}")
        write_build_config(False, "", cpu_only_reason)
        return cpp_extension.CppExtension(
            "pyprune_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    arch_list = requested_arch_list()
    try:
        flags = arch_flags(arch_list)
    except ValueError as err:
        sys.exit(f"pyprune_ext: TORCH_CUDA_ARCH_LIST={arch_list!r} cannot be built: {err}")
    archs = compiled_archs(flags)
    say(f"building the CPU and CUDA kernels, for CUDA architectures {archs}")
    write_build_config(True, archs, "")
    # torch's build reads the list from the environment: hand it the normalised one.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return cpp_extension.CUDAExtension(
        "pyprune_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        define_macros=[("PYPRUNE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"])


# setuptools runs this file as __main__ (pip, `python setup.py`); the test of the
# arch handling imports it under another name to call the functions above.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["pyprune_ext", "pyprune_ext.*"]),
        ext_modules=[make_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )
