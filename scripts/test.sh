#!/usr/bin/env bash
# Install twllm with its test tools into .venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
