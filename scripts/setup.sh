#!/usr/bin/env bash
# Sets up a working checkout: a virtual environment in .venv with torch and the
# test/benchmark dependencies, and pyprune_ext built in place (editable).
# Re-running is cheap: the extension is rebuilt only when csrc/, setup.py or
# the build settings changed.
#
# Environment: PYPRUNE_CUDA=0/1, TORCH_CUDA_ARCH_LIST, CUDA_HOME, MAX_JOBS (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${PYPRUNE_TORCH_SPEC:-torch==2.14.1}
# torchvision must be the release paired with that torch.
TORCHVISION_SPEC=${PYPRUNE_TORCHVISION_SPEC:-torchvision==0.29.1}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python

echo "== installing $TORCH_SPEC and the test/benchmark dependencies"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC" numpy ninja pytest hypothesis expecttest \
  scikit-learn tqdm matplotlib "transformers==5.24.0"

stamp_file=build/setup-stamp
stamp=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat;
          echo "${PYPRUNE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} $("$PY" -c 'import torch; print(torch.__version__)')") \
        | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$PY" -c "import pyprune_ext" 2>/dev/null; then
  echo "== pyprune_ext is up to date"
else
  echo "== building pyprune_ext (a few minutes on 2 cores when CUDA kernels are compiled)"
  "$PY" -m pip install --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$stamp" > "$stamp_file"
fi
"$PY" -c "import pyprune_ext; print('== pyprune_ext built:', pyprune_ext.build_info())"
