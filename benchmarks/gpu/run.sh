#!/usr/bin/env bash
# Output tokens/s of a Llama-3.1-8B-shaped random-weights model on one GPU, at concurrency 1, 16
# and 64, straight to vLLM and through the twllm gateway (and bare LiteLLM, for the ratio).
#   export TWLLM_MASTER_KEY="sk-$(openssl rand -hex 16)"; bash benchmarks/gpu/run.sh [OUT_DIR]
# Needs: twllm installed with the bench extra, `twllm engines install vllm`, one NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-bench-gpu-$(date +%Y%m%d-%H%M%S)}"
MODEL_DIR="${TWLLM_BENCH_MODEL_DIR:-$HOME/.cache/twllm/models/llama31-8b-random}"
PY="${PYTHON:-.venv/bin/python}"
: "${TWLLM_MASTER_KEY:?export TWLLM_MASTER_KEY first}"
mkdir -p "$OUT"
if [ ! -f "$MODEL_DIR/model.safetensors.index.json" ]; then
  "$PY" benchmarks/gpu/build_random_llama.py --out "$MODEL_DIR"
fi
sed "s#@MODEL_DIR@#$MODEL_DIR#" benchmarks/gpu/llama8b-random.yaml > "$OUT/spec.yaml"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
# Deploy once (kept running between the concurrency levels), stop at the end.
trap '"$PY" -m twllm stop --config "$OUT/spec.yaml" >/dev/null 2>&1 || true' EXIT
"$PY" -m twllm deploy --config "$OUT/spec.yaml"
for USERS in 1 16 64; do
  "$PY" -m twllm bench --compare --config "$OUT/spec.yaml" --keep --targets direct,litellm,twllm \
    --users "$USERS" --duration "${DURATION:-60s}" --rounds "${ROUNDS:-2}" --max-tokens 256 \
    --out "$OUT/c$USERS" | tee "$OUT/c$USERS.txt"
done
echo "results in $OUT (c1.txt, c16.txt, c64.txt; compare.json and compare.png per level)"
