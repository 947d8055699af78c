#!/usr/bin/env bash
# One call on a CUDA machine: install carried pure-Python wheels (opentelemetry) when present, then run
# every GPU check and benchmark. Usage: bash experiments/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_results}}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Mooncake traces carried into .traces/ (the device machine has no ../shared) are used when present.
if [ -z "${KVTRITON_TRACES:-}" ] && [ -f .traces/conversation_trace.jsonl ]; then export KVTRITON_TRACES="$PWD/.traces"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PYTHONUNBUFFERED=1 python3 experiments/gpu_check.py --out "$OUT_DIR"
