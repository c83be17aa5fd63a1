"""Latency of one forward of the default target (and draft) by CPU execution path.

Paths (the first three fp32 arithmetic and token-identical under greedy decoding):
  torch   the torch layers (``Block`` + the reference attention), fp32 weights, skinny GEMM
  fused   every layer in one C call (``pipespec_fast.cpu.decoder``), fp32 weights
  packed  the fused layers on the weights as stored (Q4_1 / Q8_0 blocks, fp16 for the draft)
  int8    ``packed`` in the int8 compute mode (``models.packed.set_compute``): products on
          Q4_1 / Q8_0 blocks with int8 activations (the head too)

For each path: milliseconds per forward of ``n`` new tokens after a ``--ctx``-token prefix
(median of ``--reps``, the paths interleaved), with 1 and 2 matmul threads. ``n = 1`` is a
decoding step; larger ``n`` are verification steps (the logits of every row are computed, as a
verifier needs them). The
last columns: the marginal cost of an extra token, (L(max n) - L(1)) / (max n - 1), and
L(max n) / L(1).

    .venv/bin/python bench/model_forward.py [--ctx 200] [--reps 30] [--model draft|target]
        [--paths torch,fused,packed,int8] [--ns 1,2,4,8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_forwards(models: dict, caches: dict, n: int, reps: int, warmup: int = 3) -> dict:
    """Median milliseconds of one forward of ``n`` new tokens after each cache's prefix, per
    model, the models interleaved repetition by repetition (so machine load drifts hit them
    alike; each cache is rolled back after each forward, so every repetition sees the same
    prefix)."""
    x = torch.full((n,), 5, dtype=torch.int64)
    out: dict = {name: [] for name in models}
    for i in range(reps + warmup):
        for name, m in models.items():
            cache = caches[name]
            start = cache.length
            t = time.perf_counter()
            m(x, cache)
            dt = time.perf_counter() - t
            cache.rollback(start)
            if i >= warmup:
                out[name].append(dt)
    return {name: statistics.median(v) * 1e3 for name, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--model", choices=["target", "draft"], default="target")
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--paths", default="torch,fused,packed,int8")
    args = ap.parse_args(argv)

    from pipespec_fast.cpu import linear
    from pipespec_fast.models.defaults import default_draft_dir, default_target_dir
    from pipespec_fast.models.llama import Transformer
    from pipespec_fast.models.packed import set_compute

    torch.set_num_threads(1)
    path = default_target_dir() if args.model == "target" else default_draft_dir()
    ns = [int(v) for v in args.ns.split(",")]
    paths = {"torch": (False, False), "fused": (False, True), "packed": (True, True),
             "int8": (True, True)}
    models = {}
    for name in args.paths.split(","):
        packed, fused = paths[name]
        m = Transformer.from_pretrained(path, packed=packed)
        m.use_fused = fused
        set_compute(m, "int8" if name == "int8" else "exact")
        models[name] = m
    prompt = torch.randint(0, 1000, (args.ctx,), generator=torch.Generator().manual_seed(0))
    print(f"{args.model} ({path.name}), {args.ctx}-token prefix, ms per forward (median of "
          f"{args.reps})\n")
    print("| path | threads | " + " | ".join(f"n={n}" for n in ns) + " | ms/extra token | "
          f"L({ns[-1]})/L({ns[0]}) |")
    print("|---|---|" + "---|" * (len(ns) + 2))
    for threads in (1, 2):
        linear.set_threads(threads)
        caches = {}
        for name, m in models.items():
            caches[name] = m.new_cache(args.ctx + max(ns) + 1)
            m(prompt, caches[name], last_n=1)
        ms = {name: [] for name in models}
        for n in ns:
            for name, v in time_forwards(models, caches, n, args.reps).items():
                ms[name].append(v)
        for name, v in ms.items():
            extra = (v[-1] - v[0]) / max(1, ns[-1] - ns[0])
            print(f"| {name} | {threads} | " + " | ".join(f"{t:.2f}" for t in v)
                  + f" | {extra:.2f} | {v[-1] / v[0]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
