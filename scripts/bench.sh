#!/usr/bin/env bash
# End-to-end benchmark: every system (ours, transformers, native llama.cpp), both tasks, greedy
# and T=0.7, then the int8 compute mode's quality figures and the pictures.
# Usage: ./scripts/bench.sh [PROMPTS] [MAX_NEW_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pip install -q matplotlib 2>&1 | grep -vE "^WARNING: Location|is ignored" || true
P=${1:-8}
N=${2:-96}
# native llama.cpp, the CPU peer (cached after the first build, ~5-10 min on 2 cores); if it
# cannot be built, e2e.py prints why and runs every other system
./scripts/build_llamacpp.sh >/dev/null \
  || echo "bench.sh: llama.cpp could not be built: its systems will be skipped" >&2
# the systems of the README's tables; llama.cpp runs greedy only (its lookup decoding is greedy)
OURS=ours_ar,ours_ar_again,ours_sync,ours_pipespec_lookup,ours_pipespec_ngram,ours_pipespec_ngram_tree,ours_pipespec2,ours_pipespec,ours_pipespec_tree
for task in humaneval mtbench; do
  .venv/bin/python bench/e2e.py --task "$task" --temperature 0 --prompts "$P" \
    --max-new-tokens "$N" --systems "hf_ar,$OURS,llamacpp_ar,llamacpp_lookup"
  .venv/bin/python bench/e2e.py --task "$task" --temperature 0.7 --prompts "$P" \
    --max-new-tokens "$N" --systems "hf_ar,$OURS"
  # sampling without a seed: our AR twice, the 2-core default, the 3-level hierarchy
  .venv/bin/python bench/e2e.py --task "$task" --temperature 0.7 --prompts "$P" \
    --max-new-tokens "$N" --unseeded --out bench/results/unseeded \
    --systems ours_ar,ours_ar_again,ours_pipespec_ngram,ours_pipespec
  # the same speculation on the exact compute mode (greedy equal to transformers)
  .venv/bin/python bench/e2e.py --task "$task" --temperature 0 --prompts "$P" \
    --max-new-tokens "$N" --compute exact --systems "$OURS" --out bench/results/exact
done
# the target's forward per block size and compute mode, prefill, resident memory
.venv/bin/python bench/model_forward.py --paths packed,int8 --ns 1,2,4,8,16 \
  | tee bench/results/model_forward.md
.venv/bin/python bench/prefill.py --paths exact,int8 | tee bench/results/prefill.md
# how fast any window rule could make the n-gram drafter's chains on these prompts
.venv/bin/python bench/ngram_ceiling.py --prompts "$P" --max-new-tokens "$N" \
  | tee bench/results/ngram_ceiling.md
.venv/bin/python bench/memory.py --tokens 512 --json bench/results/memory.json
.venv/bin/python bench/memory.py --tokens 512 --no-draft --json bench/results/memory-nodraft.json
# what the int8 compute mode (the default) costs in quality against exact: no timings
.venv/bin/python bench/int8_quality.py --json bench/results/int8_quality.json
.venv/bin/python bench/plots.py
