#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit, kernel (Triton interpreter),
# statistical and end-to-end tests on the embedded default model. Extra args go to pytest
# (e.g. -k NAME to select, -n 0 for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
# One pytest worker per CPU this process may use (pytest-xdist), each test file on one worker
# (a module's fixtures, e.g. the GPU check's dry run, are made once). Tests mostly run Python and
# single-threaded torch; generations size their C thread pools from the cores left free.
# Pass -n 0 for one process (print output, --pdb).
exec .venv/bin/python -m pytest -q -n "$(nproc)" --dist loadfile "$@"
