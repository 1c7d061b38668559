#!/usr/bin/env bash
# One GPU session (the lead runs it on the H200 through the device tool, from the repo root):
# the CUDA tests, then the decode benchmark of issue 5 (retention eager / CUDA graph vs HF
# Llama + KV cache at 1k-64k). Everything lands in $OUT (flat); the key tables print last.
# About 3-5 minutes on an H200 (Triton and inductor compiles, 64k prefills); each part has a
# timeout, 590 s in all, under the device tool's 600 s per command.
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    $PY -c "import transformers; print('transformers', transformers.__version__)" || true
} 2>&1 | tee "$OUT/env.txt"

# The package must import as `retention` with its kernels (retention.kernels -> kernels/).
if ! $PY -c "import retention.kernels.triton" 2>/dev/null; then
    $PY -m pip install -q -e . --no-deps 2>&1 | tail -2 | tee -a "$OUT/env.txt"
fi

echo "== GPU tests" | tee "$OUT/gpu_tests.txt"
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider tests/torch tests/test_generation_backends.py \
    -k "cuda or gpu or graph" 2>&1 | tee -a "$OUT/gpu_tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.txt"

echo "== decode benchmark, bfloat16" | tee "$OUT/generate_bf16.txt"
timeout 300 $PY benchmarks/generate.py --device cuda --dtype bfloat16 \
    --contexts 1024 8192 32768 65536 --json "$OUT/generate_bf16.json" 2>&1 \
    | tee -a "$OUT/generate_bf16.txt"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/generate_bf16.txt"

# float32, short: random fill (the same decode work without the prefills), no compiled row.
echo "== decode benchmark, float32 (1k, 32k)" | tee "$OUT/generate_fp32.txt"
timeout 90 $PY benchmarks/generate.py --device cuda --dtype float32 --repeats 1 --fill random \
    --no-compile --contexts 1024 32768 --json "$OUT/generate_fp32.json" 2>&1 \
    | tee -a "$OUT/generate_fp32.txt"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/generate_fp32.txt"

echo
echo "================ key results ================"
tail -n 3 "$OUT/gpu_tests.txt"
echo "-- float32"
sed -n '/^| framework/,$p' "$OUT/generate_fp32.txt"
echo "-- bfloat16"
sed -n '/^| framework/,$p' "$OUT/generate_bf16.txt"
