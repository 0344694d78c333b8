#!/usr/bin/env bash
# Part 4 of the benchmark: parts 2 and 3 on an NVIDIA GPU with ONNX Runtime's CUDA execution provider.
#
#   bash bench/gpu.sh            (or: make bench-gpu)   BENCH_PRESET=reduced|full|smoke
#
# Needs: nvidia-smi seeing a GPU; the project venv with onnxruntime-gpu instead of onnxruntime
# (pip uninstall -y onnxruntime && pip install onnxruntime-gpu); wrk. Triton (c) runs too when
# .venv-triton's onnxruntime has CUDA (.venv-triton/bin/pip install onnxruntime-gpu), else it is skipped.
# Part 2 uses IO binding; the server uses it on CUDA by itself (service/runtime.py). Batch sizes 1, 64,
# 256 and 1024; the server's max batch size is 256. Writes bench/results/gpu_cost.json, gpu_server.json
# and regenerates docs/BENCHMARKS.md (sections 4a/4b, with the card's name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${BENCH_PRESET:-reduced}

fail() { echo "bench/gpu.sh: $*" >&2; echo "bench/gpu.sh: GPU numbers stay pending in docs/BENCHMARKS.md" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA GPU here (nvidia-smi not found)"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1) || true
[ -n "${gpu:-}" ] || fail "nvidia-smi sees no GPU"
"$PY" - <<'PYCHECK' || fail "the project venv's onnxruntime has no CUDAExecutionProvider: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
import sys
import onnxruntime as ort
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)
PYCHECK
command -v wrk >/dev/null 2>&1 || fail "wrk missing (make bench-deps)"

configs=hydra,hydra-b1
if [ -x .venv-triton/bin/python ] && .venv-triton/bin/python -c \
    "import sys, onnxruntime as o; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
  configs=$configs,triton
else
  echo "bench/gpu.sh: .venv-triton has no onnxruntime-gpu: Triton (c) skipped on GPU" >&2
fi

echo "bench/gpu.sh: $gpu"
"$PY" -m bench cost --preset "$PRESET" --batches 1,64,256,1024 --provider CUDAExecutionProvider --io-binding \
  --output gpu_cost
"$PY" -m bench server --preset "$PRESET" --provider CUDAExecutionProvider --max-batch-size 256 \
  --configs "$configs" --output gpu_server
