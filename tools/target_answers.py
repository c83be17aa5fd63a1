"""The default target's own greedy answers, as this engine decodes them (int8 compute), to the
prompts of the draft's distillation data (``tools/draft_data.py``: never a benchmark prompt),
for the n-gram store (``tools/ngram_store.py --answers``).

    .venv/bin/python -m tools.target_answers DATA_DIR [DATA_DIR ...] --out answers.pt \\
        [--max-new-tokens 128] [--limit N]

The distinct prompts are taken in a fixed shuffled order (seed 0), so ``--limit`` keeps a
reproducible subset; the file (a list of token-id lists, ``torch.save``) is replaced whole
every 100 answers (written aside, then renamed), so an interrupted run keeps what it made.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch


def prompts_of(dirs: list[Path]) -> list[list[int]]:
    """Every distinct prompt of the data folders' kept rows (``train_draft.kept_rows``), as
    token ids, in a fixed shuffled order."""
    from tools.train_draft import kept_rows

    seen, out = set(), []
    for r in kept_rows(dirs):
        p = r["prompt"]
        ids = tuple(int(x) for x in (p.tolist() if hasattr(p, "tolist") else p))
        if ids not in seen:
            seen.add(ids)
            out.append(list(ids))
    random.Random(0).shuffle(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", type=Path, help="distillation data folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, help="answer only the first N prompts")
    args = ap.parse_args(argv)
    from pipespec_fast import FastPipeline

    prompts = prompts_of(args.data)[: args.limit]
    pipe = FastPipeline.from_default(draft=False)  # the n-gram drafter: the same greedy tokens
    out: list[list[int]] = []
    t0, tokens = time.time(), 0
    for i, p in enumerate(prompts):
        out.append(pipe.generate(p, args.max_new_tokens).token_ids)
        tokens += len(out[-1])
        if (i + 1) % 100 == 0 or i + 1 == len(prompts):
            tmp = args.out.with_name(args.out.name + ".tmp")
            torch.save(out, tmp)
            os.replace(tmp, args.out)
            print(f"{i + 1}/{len(prompts)} answers, {tokens} tokens, "
                  f"{tokens / (time.time() - t0):.0f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
