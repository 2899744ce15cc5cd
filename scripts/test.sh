#!/usr/bin/env bash
# The test command: set up (apt + pip + build), then lint, type-check and run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=${PYTHON:-python3}
echo "test: ruff"
"$PY" -m ruff check dvs tests benchmarks examples csrc/build_ffi.py
"$PY" -m ruff format --check dvs tests benchmarks examples csrc/build_ffi.py
echo "test: mypy (strict on dvs/)"
"$PY" -m mypy
echo "test: pytest"
exec "$PY" -m pytest "$@"
