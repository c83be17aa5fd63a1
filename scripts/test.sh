#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit, kernel (Triton interpreter),
# statistical and end-to-end tests on the embedded default model. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
