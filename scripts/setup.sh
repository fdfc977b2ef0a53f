#!/usr/bin/env bash
# Create .venv and install twllm into it. `scripts/setup.sh --dev` adds what the tests and the
# gates need: the test and lint tools, the guard models' torch/transformers, locust.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "twllm needs Python 3.11 or newer (found $("$PYTHON" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  # Ask for torch's CPU build by its exact version: an open range makes pip take a multi-GB CUDA
  # build (it is found locally here, or on PyTorch's CPU index).
  .venv/bin/python -m pip install --quiet 'torch==2.13.0' \
    || .venv/bin/python -m pip install --quiet 'torch==2.13.0' --extra-index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install --quiet -e '.[dev,guard,bench]'
else
  .venv/bin/python -m pip install --quiet -e .
fi
echo "twllm installed in .venv ($(.venv/bin/twllm --version))" >&2
