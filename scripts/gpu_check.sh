#!/usr/bin/env bash
# The GPU check (issue 20): build for the visible GPU, the whole test suite with
# every CUDA test counted, compute-sanitizer, both commands, the benchmarks and
# a pruned ResNet-50's latency, into benchmarks/results/gpu_check.json and
# benchmarks/results/gpu_check/*.log. Without a GPU it runs a cheap dry mode.
# All the logic is in tools/gpu_check.py; `bash scripts/gpu_check.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" tools/gpu_check.py --python "$PY" "$@"
