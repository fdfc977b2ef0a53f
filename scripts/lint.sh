#!/usr/bin/env bash
# The gates CI runs before the tests: lint, format, types, and the import rules between stages.
# Each must pass with zero findings; run `bash scripts/lint.sh` after `scripts/setup.sh --dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/lint-imports ] || bash scripts/setup.sh --dev
PY_DIRS=(twllm tests benchmarks scripts)
step() { printf '== %s\n' "$1" >&2; }
step "ruff check (lint)";             .venv/bin/ruff check "${PY_DIRS[@]}"
step "ruff format --check";           .venv/bin/ruff format --check "${PY_DIRS[@]}"
step "mypy twllm";                    .venv/bin/mypy
step "lint-imports (stage layers)";   .venv/bin/lint-imports --no-cache
