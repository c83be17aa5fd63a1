"""Build the default target's n-gram store (``pipespec_fast.stages.ngram_store``) from its own
answers: those of the draft's distillation data (``tools/draft_data.py``: the target's greedy
and sampled answers to prompts that are not in any benchmark) and, with ``--answers``, more of
them (``tools/target_answers.py``: the int8 target's greedy answers, as this engine decodes
them).

    .venv/bin/python -m tools.ngram_store DATA_DIR [DATA_DIR ...] [--answers FILE ...] \
        [--out models/drafts/SmolLM2-135M-ngram] [--max-order 6]

Each ``DATA_DIR`` holds ``shard-*.pt`` files of rows with the answer's ``tokens``; only the
answers go in (not the prompts), and only of the rows the draft's training keeps
(``train_draft.load_rows``: none whose prompt resembles a benchmark question). The store
records the fingerprint of the default draft folder's vocabulary (the target's:
``loading.check_tokenizers`` holds them equal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def answers(dirs: list[Path]) -> list[list[int]]:
    """Every kept row's answer tokens (``train_draft.kept_rows``), in order."""
    from tools.train_draft import kept_rows

    return [[int(x) for x in (r["tokens"].tolist() if hasattr(r["tokens"], "tolist")
                              else r["tokens"])] for r in kept_rows(dirs)]


def answer_file(path: Path) -> list[list[int]]:
    """A ``--answers`` file: a list of token-id lists (``tools/target_answers.py``)."""
    data = torch.load(path, weights_only=True)
    if not isinstance(data, list) or not all(
            isinstance(a, list) and all(isinstance(t, int) for t in a) for a in data):
        raise SystemExit(f"--answers: {path} is not a list of token-id lists")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", type=Path, help="distillation data folders")
    ap.add_argument("--out", type=Path, default=ROOT / "models/drafts/SmolLM2-135M-ngram")
    ap.add_argument("--max-order", type=int, default=6)
    ap.add_argument("--answers", nargs="*", type=Path, default=[],
                    help="more answers: files of a list of token-id lists (torch.save)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pipespec_fast.loading import load_tokenizers
    from pipespec_fast.models.defaults import DRAFT_DIR
    from pipespec_fast.stages.ngram_store import NGramStore, vocab_fingerprint

    tok = load_tokenizers([DRAFT_DIR])[0]
    cfg = json.loads((DRAFT_DIR / "config.json").read_text())
    seqs = answers(args.data) + [a for f in args.answers for a in answer_file(f)]
    meta = {"vocab_sha256": vocab_fingerprint(tok.get_vocab()),
            "made_by": "tools/ngram_store.py: the answers (not the prompts) of "
                       + ", ".join([p.name for p in args.data] + [p.name for p in args.answers])}
    store = NGramStore(seqs, cfg["vocab_size"], 2, args.max_order, meta)
    store.save(args.out)
    print(f"{store.sequences} answers, {store.tokens} tokens, {len(store)} contexts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
