#!/usr/bin/env bash
# Installs pyprune_ext the ways users install it and uses each install from
# outside the source tree. Run by CI; runs anywhere the README's set-up works.
#   1. `pip install .` with build isolation stops at once, saying to use
#      --no-build-isolation.
#   2. `pip install --no-build-isolation .` (not editable, the default build:
#      CUDA kernels for the default arch list when nvcc is there) into a clean
#      venv that has torch: import, `pyprune info`, `pyprune taylor --epochs 1`,
#      and the ops against plain PyTorch.
#   3. `pip wheel --no-build-isolation --no-deps .`, installed into another
#      clean venv and used the same way.
#   4. An sdist, checked for every file a build needs, and a CPU-only wheel
#      built from it (PYPRUNE_CUDA=0), installed and used the same way.
# The builds run in a copy of the tree (tracked and untracked, non-ignored files),
# so the checkout's own build is left as it is.
#
# Environment: PYPRUNE_TORCH_SPEC (torch==2.14.1), PYPRUNE_PACKAGING_DIR (a new
# temporary folder; kept on failure for inspection).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_SPEC=${PYPRUNE_TORCH_SPEC:-torch==2.14.1}
WORK=${PYPRUNE_PACKAGING_DIR:-$(mktemp -d -t pyprune-packaging.XXXXXX)}
mkdir -p "$WORK/elsewhere"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
step() { echo "== packaging [$((SECONDS / 60))m$((SECONDS % 60))s]: $*"; }

copy_tree() {  # $1: destination
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$1"
}

fresh_venv() {  # $1: path. A venv with torch and the build tools, nothing else.
  python3 -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip setuptools wheel ninja
  "$1/bin/python" -m pip install -q "$TORCH_SPEC" numpy
}

# Uses an installed pyprune_ext from a folder outside the source tree; $2 is
# "cuda" or "cpu", what build_info must report; $3 the arch list expected (or
# empty); $4 the CPU-only reason expected (or empty).
use_installed() {
  local venv=$1 kind=$2 archs=${3:-} reason=${4:-}
  (cd "$WORK/elsewhere" && "$venv/bin/python" - "$venv" "$kind" "$archs" "$reason" <<'PY'
import os, sys, torch
venv, kind, archs, reason = sys.argv[1:]
import pyprune_ext
where = os.path.realpath(pyprune_ext.__file__)
assert where.startswith(os.path.realpath(venv)), f"pyprune_ext imported from {where}, not from {venv}"
info = pyprune_ext.build_info()
assert info["cuda"] == (kind == "cuda"), info
if archs:
    assert info["cuda_arch_list"] == archs, info
if reason:
    assert info["cpu_only_reason"] == reason, info
# The ops against plain PyTorch in float64.
torch.manual_seed(0)
a, g = torch.randn(4, 6, 5, 3, dtype=torch.float64), torch.randn(4, 6, 5, 3, dtype=torch.float64)
first, second = pyprune_ext.taylor_channel_stats(a, g)
s = (a * g).sum((2, 3))
torch.testing.assert_close(first, s.sum(0)); torch.testing.assert_close(second, (s * s).sum(0))
x, w = torch.randn(7, 12, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
mask = torch.rand(9, 12) < 0.3
torch.testing.assert_close(pyprune_ext.masked_linear(x, w, mask), x @ (w * mask).T)
torch.testing.assert_close(pyprune_ext.sparse_masked_linear(x, w, pyprune_ext.mask_pack(mask)), x @ (w * mask).T)
masks, threshold, ties = pyprune_ext.magnitude_prune([w], [mask], 3)
assert int(mask.sum() - masks[0].sum()) == 3
print("pyprune_ext", pyprune_ext.__version__, "from", os.path.dirname(where), info)
PY
  "$venv/bin/pyprune" info
  "$venv/bin/pyprune" taylor --epochs 1 --quiet --out "$WORK/elsewhere/taylor-$kind")
}

step "clean venvs with $TORCH_SPEC"
fresh_venv "$WORK/venv-a"
fresh_venv "$WORK/venv-b"
copy_tree "$WORK/src"

step "pip install . with build isolation must stop at once and say why"
set +e
(cd "$WORK/src" && "$WORK/venv-a/bin/python" -m pip install . > "$WORK/isolated.log" 2>&1)
isolated_rc=$?
set -e
if [ "$isolated_rc" -eq 0 ] || ! grep -q -- "pip install --no-build-isolation ." "$WORK/isolated.log"; then
  tail -20 "$WORK/isolated.log"; echo "FAIL: an isolated build did not stop with the --no-build-isolation message"; exit 1
fi
grep -m1 "pyprune_ext is compiled against" "$WORK/isolated.log"

# What the default build must hold: the CUDA kernels when torch has CUDA and
# nvcc is there, for "8.0;9.0" when neither an arch list nor a GPU is given.
kind=cpu; archs=
if "$WORK/venv-a/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" \
   && [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  kind=cuda
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && "$WORK/venv-a/bin/python" -c \
       "import sys, torch; sys.exit(torch.cuda.is_available())"; then
    archs="8.0;9.0"
  fi
fi

step "pip install --no-build-isolation . (not editable, default build: $kind) into a clean venv"
(cd "$WORK/src" && "$WORK/venv-a/bin/python" -m pip install -q --no-build-isolation .)
use_installed "$WORK/venv-a" "$kind" "$archs"

step "pip wheel --no-build-isolation --no-deps ., installed into another clean venv"
# The same tree and torch as the install above: its compiled objects are reused.
(cd "$WORK/src" && "$WORK/venv-a/bin/python" -m pip wheel -q --no-build-isolation --no-deps . -w "$WORK/wheels")
"$WORK/venv-b/bin/python" -m pip install -q "$WORK"/wheels/pyprune_ext-*.whl
use_installed "$WORK/venv-b" "$kind" "$archs"

step "sdist: complete, and a wheel built from it"
(cd "$WORK/src" && "$WORK/venv-b/bin/python" setup.py -q sdist -d "$WORK/sdist" > /dev/null)
sdist=$(ls "$WORK"/sdist/pyprune_ext-*.tar.gz)
"$WORK/venv-b/bin/python" - "$sdist" "$WORK/src" <<'PY'
import os, sys, tarfile
sdist, src = sys.argv[1:]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
needed = ["setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md"]
for folder in ("csrc", "pyprune_ext"):
    for dirpath, _, files in os.walk(os.path.join(src, folder)):
        needed += [os.path.relpath(os.path.join(dirpath, f), src) for f in files
                   if f.endswith((".h", ".in", ".cpp", ".cu", ".py")) and f != "_build_config.py"]
missing = sorted(n for n in needed if n not in names)
assert not missing, f"the sdist lacks {missing}"
assert "pyprune_ext/_build_config.py" not in names, "the sdist ships a build's _build_config.py"
print(f"sdist holds {len(names)} files, the {len(needed)} a build needs among them")
PY
step "a CPU-only wheel (PYPRUNE_CUDA=0) built from the sdist, installed in place of the first"
(cd "$WORK/elsewhere" && PYPRUNE_CUDA=0 "$WORK/venv-b/bin/python" -m pip wheel -q \
   --no-build-isolation --no-deps "$sdist" -w "$WORK/sdist-wheels")
"$WORK/venv-b/bin/python" -m pip install -q --force-reinstall --no-deps "$WORK"/sdist-wheels/pyprune_ext-*.whl
use_installed "$WORK/venv-b" cpu "" "PYPRUNE_CUDA=0"

step "all packaging checks passed"
[ -z "${PYPRUNE_PACKAGING_DIR:-}" ] && rm -rf "$WORK"
exit 0
