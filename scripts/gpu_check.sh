#!/usr/bin/env bash
# The first command to run whenever a GPU is available (issue 13): compiled kernels against
# the references, greedy equality pipespec/sync/ar, sampling sanity, and the benchmarks, in
# under 8 minutes on one H200; writes one JSON (default bench/results/gpu_check.json) and
# exits non-zero when a correctness check failed. Needs only torch and triton: no network, no
# install. --dry-run runs the same code on CPU (Triton's interpreter, tiny sizes).
# Usage: ./scripts/gpu_check.sh [--dry-run] [--budget-scale X] [OUT.json]
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The repository's own files as the package, without installing it: pipespec_fast/ with
# csrc_triton/ as pipespec_fast.kernels and models/ as pipespec_fast.models (pyproject's
# package-dir), linked into a temporary folder put first on the import path.
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir "$STAGE/pipespec_fast"
for f in "$PWD"/pipespec_fast/*; do ln -s "$f" "$STAGE/pipespec_fast/"; done
ln -s "$PWD/csrc_triton" "$STAGE/pipespec_fast/kernels"
ln -s "$PWD/models" "$STAGE/pipespec_fast/models"
PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_check.py "$@"
