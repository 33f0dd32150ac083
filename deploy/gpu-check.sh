#!/usr/bin/env bash
# `make gpu-check`: prove the CUDA path on a host with an NVIDIA GPU, in one go (a few minutes).
#
# 1. A virtual environment of its own (.venv-gpu): the CPU and GPU builds of ONNX Runtime never
#    share one, so the project's .venv is left alone. torch is the CPU build: it only trains and
#    exports the tests' tiny model; serving never imports it.
# 2. Fails at once, loudly, when ONNX Runtime offers no CUDAExecutionProvider.
# 3. Every test marked `cuda` (the KV cache kept on the GPU, results equal to the CPU's).
# 4. A short `seqserve bench` on CUDA (random-weight small model, batch 1 and 16) and a short
#    `seqserve bench-serve` of that model (the server picks CUDA by itself: --device auto).
# Results go to $OUT (default runs/gpu-check): the pytest log and both benchmarks' JSON.
#
# Environment: PYTHON (default python3), GPU_VENV (default .venv-gpu), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
"$VENV/bin/pip" install --quiet "torch==2.13.*"
"$VENV/bin/pip" install --quiet -e ".[gpu,train,dev,tracing]"

step "CUDA provider"
"$VENV/bin/python" - <<'EOF'
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
if "CUDAExecutionProvider" not in providers:
    sys.exit("gpu-check: FAILED: ONNX Runtime offers no CUDAExecutionProvider (no GPU, no driver, "
             "or a CUDA/cuDNN that this onnxruntime-gpu build does not load)")
EOF

step "tests marked cuda"
"$VENV/bin/pytest" -m cuda -p no:cacheprovider -ra 2>&1 | tee "$OUT/pytest-cuda.log"

step "seqserve bench on CUDA"
"$VENV/bin/seqserve" bench --preset small --device cuda --batch 1 16 --new-tokens 32 --budget 5 \
    --cache-dir "$OUT/models" --json "$OUT/bench.json"

step "seqserve bench-serve on CUDA"
model=$(find "$OUT/models" -mindepth 1 -maxdepth 1 -type d -name '*-fp32-*' | head -n 1)
"$VENV/bin/seqserve" bench-serve "$model" --duration 5 --warmup 1 --json "$OUT/bench-serve.json"

step "done: results in $OUT"
