"""Teacher-forced greedy agreement of draft folders with the default target on the benchmarks'
prompts: the per-token acceptance a greedy verifier would see, without a pipeline's timing.

    .venv/bin/python -m tools.draft_agreement models/drafts/SmolLM2-135M-draft /tmp/other-draft

For each task, the default (int8) target answers ``--prompts`` benchmark prompts greedily
(``--tokens`` new tokens); every draft then reads prompt + answer in one forward, and a position
agrees when the draft's argmax is the target's token there. Drafts run as the pipeline runs
them (fp16 weights as Q8_0 blocks, the int8 compute mode). Evaluation only: nothing here is
trained on these prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_draft(path: str, target):
    """A draft folder as the pipeline runs it: a model, or a feature head over ``target``
    (``models/feature_head.py``: it reads the target's features, here the teacher-forced
    ones of the target's answer)."""
    from pipespec_fast.models.feature_head import FeatureHead, is_feature_head
    from pipespec_fast.models.llama import Transformer
    from pipespec_fast.models.packed import requantize_fp16, set_compute

    head = FeatureHead.from_pretrained(path, target) if is_feature_head(path) else None
    m = head.body if head is not None else Transformer.from_pretrained(path)
    requantize_fp16(m)
    set_compute(m, "int8")
    if head is None:
        return m

    def run(seq: torch.Tensor, cache) -> torch.Tensor:
        feats = torch.zeros(len(seq) + 1, target.config.dim)
        target(seq, target.new_cache(len(seq) + 1), last_n=1, features=feats)
        prev = torch.cat([torch.zeros(1, target.config.dim), feats[: len(seq) - 1]])
        return head.forward(seq, prev, cache, last_n=len(seq))[0]

    run.new_cache = head.new_cache
    return run


def agreement(pipe, drafts: dict, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Share of the target's greedy answer positions where each draft's argmax agrees."""
    hits = dict.fromkeys(drafts, 0)
    total = 0
    for ids in prompts:
        answer = pipe.generate(ids, tokens, mode="ar", ignore_eos=True).token_ids
        seq = torch.tensor(ids + answer)
        total += len(answer)
        for name, m in drafts.items():
            pred = m(seq[:-1], m.new_cache(len(seq) + 1))[len(ids) - 1:].argmax(-1)
            hits[name] += int((pred == seq[len(ids):]).sum())
    return {name: round(h / total, 4) for name, h in hits.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", help="draft model folders")
    ap.add_argument("--prompts", type=int, default=12, help="prompts per task")
    ap.add_argument("--tokens", type=int, default=96, help="the target's answer length")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from e2e import load_prompts

    from pipespec_fast import FastPipeline

    for d in args.drafts:
        if not (Path(d) / "config.json").is_file():
            raise SystemExit(f"drafts: {d} is not a model folder (no config.json)")
    pipe = FastPipeline.from_default(draft=False)
    drafts = {d: _load_draft(d, pipe.stages[-1].model) for d in args.drafts}
    with torch.inference_mode():
        for task in ("humaneval", "mtbench"):
            prompts = [pipe.chat_prompt(p) for p in load_prompts(task, args.prompts)]
            print(task, agreement(pipe, drafts, prompts, args.tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
