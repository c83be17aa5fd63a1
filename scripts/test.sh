#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit, kernel (Triton interpreter),
# statistical and end-to-end tests on the embedded default model, one worker per CPU.
# Extra args go to pytest (e.g. -n 0 for one process, -k NAME to select).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
# one pytest worker per CPU (pytest-xdist; work stealing evens out the long tests); the
# engine sizes its own thread pools from the cores left free, so the workers do not oversubscribe
exec .venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
