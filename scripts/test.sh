#!/usr/bin/env bash
# Install twllm with its test tools into .venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# The guard models' tests need torch. Ask for the CPU build by its exact version: an open range
# makes pip take a multi-GB CUDA build (it is found locally here, or on PyTorch's CPU index).
.venv/bin/python -m pip install --quiet 'torch==2.13.0' \
  || .venv/bin/python -m pip install --quiet 'torch==2.13.0' --extra-index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install --quiet -e '.[dev,guard,bench]'
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
