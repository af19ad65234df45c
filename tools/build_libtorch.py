"""Configure and build the CMake op library (libpyprune_ops.so) against the
installed torch, passing what a pip-installed CUDA torch needs to configure
(see README, "Building for libtorch (C++)"). Prints the library's path.

    python tools/build_libtorch.py [--cuda] [--build-dir DIR] [--arch 9.0]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmake_architectures(arch_list: str) -> str:
    """"8.0;9.0+PTX" or "8.0 9.0" -> "80;90", CMake's spelling."""
    entries = [e for e in re.split(r"[;,\s]+", arch_list) if e]
    return ";".join(e.split("+")[0].replace(".", "") for e in entries)


def configure_args(cuda: bool, arch: str) -> list[str]:
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYPRUNE_WITH_CUDA={'ON' if cuda else 'OFF'}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if torch.version.cuda is not None:
        # TorchConfig of a CUDA torch looks for the toolkit and NVRTC even for a CPU-only library.
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        site = os.path.dirname(os.path.dirname(torch.__file__))
        nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so.*")))
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DTORCH_CUDA_ARCH_LIST={arch}",
                 f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}",
                 f"-DCMAKE_CUDA_ARCHITECTURES={cmake_architectures(arch)}"]  # for enable_language; torch overrides
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return args


def build(build_dir: str, cuda: bool = False, arch: str = "9.0", quiet: bool = False) -> str:
    """Configure (once) and build; returns the path of libpyprune_ops.so."""
    out = subprocess.DEVNULL if quiet else None
    if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
        subprocess.run(["cmake", "-S", ROOT, "-B", build_dir] + configure_args(cuda, arch),
                       check=True, stdout=out)
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    subprocess.run(["cmake", "--build", build_dir, "--parallel", jobs], check=True, stdout=out)
    return os.path.join(build_dir, "libpyprune_ops.so")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="also compile the CUDA kernels")
    parser.add_argument("--build-dir", default=None, help="default: build/cmake-cpu or build/cmake-cuda")
    parser.add_argument("--arch", default="9.0", help='CUDA architectures, e.g. "8.0;9.0" (default 9.0)')
    args = parser.parse_args()
    build_dir = args.build_dir or os.path.join(ROOT, "build", "cmake-cuda" if args.cuda else "cmake-cpu")
    print(build(build_dir, args.cuda, args.arch))


if __name__ == "__main__":
    main()
