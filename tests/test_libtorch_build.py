"""The CMake build (for libtorch/C++ users) produces a library that registers
the same ops, loadable with torch.ops.load_library and correct on its own."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Runs in a fresh interpreter: pyprune_ext (which registers the same op names)
# must not be imported there.
CHECK_LOADED_LIBRARY = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
assert "pyprune_ext" not in sys.modules
a = torch.randn(5, 7, 6, 4, dtype=torch.float64)
g = torch.randn_like(a)
first, second = torch.ops.pyprune.taylor_channel_stats(a, g, 1)
s = (a * g).sum((2, 3))
torch.testing.assert_close(first, s.sum(0))
torch.testing.assert_close(second, (s * s).sum(0))
cuda, archs, torch_version, openmp = torch.ops.pyprune._build_info()
assert torch_version == torch.__version__.split("+")[0], torch_version
try:
    torch.ops.pyprune.taylor_channel_stats(a, g[:, :3], 1)
    raise SystemExit("a shape mismatch was not rejected")
except RuntimeError as err:
    assert "same shape" in str(err)
print("ok", cuda, openmp)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_loads_and_computes():
    import build_libtorch

    build_dir = os.path.join(ROOT, "build", "cmake-cpu")
    library = build_libtorch.build(build_dir, cuda=False, quiet=True)
    assert os.path.exists(library)
    result = subprocess.run([sys.executable, "-c", CHECK_LOADED_LIBRARY, library],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "False", "True"]
