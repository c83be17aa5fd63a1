"""Latency of one forward of the default target (and draft) by CPU execution path.

Paths, all fp32 arithmetic and token-identical under greedy decoding:
  torch   the torch layers (``Block`` + the reference attention), fp32 weights, skinny GEMM
  fused   every layer in one C call (``pipespec_fast.cpu.decoder``), fp32 weights
  packed  the fused layers on the weights as stored (Q4_1 / Q8_0 blocks, fp16 for the draft)

For each path: milliseconds per forward of ``n`` new tokens after a ``--ctx``-token prefix
(median of ``--reps``), with 1 and 2 matmul threads. ``n = 1`` is a decoding step; larger ``n``
are verification steps (the logits of every row are computed, as a verifier needs them).

    .venv/bin/python bench/model_forward.py [--ctx 200] [--reps 30] [--model draft|target]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_forward(model, cache, n: int, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of one forward of ``n`` new tokens after the cache's prefix (the
    cache is rolled back after each, so every repetition sees the same prefix)."""
    x = torch.full((n,), 5, dtype=torch.int64)
    start = cache.length
    out = []
    for i in range(reps + warmup):
        t = time.perf_counter()
        model(x, cache)
        dt = time.perf_counter() - t
        cache.rollback(start)
        if i >= warmup:
            out.append(dt)
    return statistics.median(out) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--model", choices=["target", "draft"], default="target")
    ap.add_argument("--ns", default="1,2,4,8")
    args = ap.parse_args(argv)

    from pipespec_fast.cpu import linear
    from pipespec_fast.models.defaults import default_draft_dir, default_target_dir
    from pipespec_fast.models.llama import Transformer

    torch.set_num_threads(1)
    path = default_target_dir() if args.model == "target" else default_draft_dir()
    ns = [int(v) for v in args.ns.split(",")]
    models = {}
    for name, packed, fused in (("torch", False, False), ("fused", False, True),
                                ("packed", True, True)):
        m = Transformer.from_pretrained(path, packed=packed)
        m.use_fused = fused
        models[name] = m
    prompt = torch.randint(0, 1000, (args.ctx,), generator=torch.Generator().manual_seed(0))
    print(f"{args.model} ({path.name}), {args.ctx}-token prefix, ms per forward (median of "
          f"{args.reps})\n")
    print("| path | threads | " + " | ".join(f"n={n}" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for threads in (1, 2):
        linear.set_threads(threads)
        for name, m in models.items():
            cache = m.new_cache(args.ctx + max(ns) + 1)
            m(prompt, cache, last_n=1)
            cells = [f"{time_forward(m, cache, n, args.reps):.2f}" for n in ns]
            print(f"| {name} | {threads} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
