"""Settings sweep for our own systems (how the defaults were chosen), prompt by prompt
interleaved so that machine noise hits every variant alike.

    .venv/bin/python bench/sweep.py --task humaneval --prompts 4 --max-new-tokens 96

Each variant is ``name=mode[;windows=a,b,c][;leads=a,b,c][;threads=a,b,c]`` over the default
hierarchy (``threads``: matmul threads per PipeSpec worker, the variant pipeline's
``RuntimeConfig.stage_threads``).
Prints median tokens/s per variant, relative to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = [
    "sync=sync",
    "pipespec=pipespec",
    "pipespec_t112=pipespec;threads=1,1,2",
    "pipespec_w4=pipespec;windows=0,4,4",
    "pipespec_w8=pipespec;windows=0,8,8;leads=12,12,0",
]


def parse(spec: str) -> tuple[str, str, dict]:
    """``name=mode;key=a,b,c...`` -> (name, mode, FastPipeline keyword arguments)."""
    from pipespec_fast import config

    name, rest = spec.split("=", 1)
    parts = rest.split(";")
    kw: dict = {}
    for p in parts[1:]:
        key, val = p.split("=", 1)
        values = [int(x) for x in val.split(",")]
        if key == "threads":
            kw["config"] = config.current().replace(stage_threads=tuple(values))
        else:
            kw[{"windows": "windows", "leads": "max_leads"}[key]] = values
    return name, parts[0], kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="humaneval", choices=["humaneval", "mtbench"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = ap.parse_args(argv)

    from bench.e2e import load_prompts
    from pipespec_fast import FastPipeline

    base = FastPipeline.from_default(draft=True)
    variants = []
    for spec in args.variants:
        name, mode, kw = parse(spec)
        variants.append((name, mode, FastPipeline(base.stages, tokenizer=base.tokenizer, **kw)))
    prompts = [base.chat_prompt(p) for p in load_prompts(args.task, args.prompts)]
    speeds: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _, mode, pipe in variants:  # warm-up
        pipe.generate(prompts[0][:32], 4, mode=mode)
    for i, ids in enumerate(prompts):
        for name, mode, pipe in variants:
            res = pipe.generate(ids, args.max_new_tokens, mode=mode, ignore_eos=True)
            speeds[name].append(res.stats["tokens_per_s"])
            print(f"prompt {i}: {name:16s} {speeds[name][-1]:6.1f} tok/s", file=sys.stderr)
    first = statistics.median(speeds[variants[0][0]])
    print(f"\n{args.task}, {len(prompts)} prompts, {args.max_new_tokens} new tokens (greedy)")
    print("| variant | median tokens/s | vs first |\n|---|---|---|")
    for name, xs in speeds.items():
        m = statistics.median(xs)
        print(f"| {name} | {m:.1f} | {m / first:.2f}x |")
    base.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
