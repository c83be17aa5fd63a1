"""Prefill speed of the default target by path, interleaved in one run.

Paths (all through the fused C layer stack):
  exact   the packed weights (Q4_1 / Q8_0 blocks dequantised per panel: the exact mode)
  int8    the same blocks in the int8 compute mode (activations quantised per 32 values)
  fp32    fp32 copies of the same values (the skinny fp32 GEMM; exact, same tokens as exact)

For each repetition and thread count, each path prefills the same ``--tokens``-token prompt
into an empty cache (logits of the last token only, as generation does); the table gives the
median tokens/s per path and each path's ratio to the first. Timings on a shared machine are
noisy: read the ratios.

    .venv/bin/python bench/prefill.py [--tokens 512] [--reps 5] [--threads 1,2]
        [--paths exact,int8,fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--paths", default="exact,int8,fp32")
    args = ap.parse_args(argv)

    from pipespec_fast.cpu import linear
    from pipespec_fast.models.defaults import default_target_dir
    from pipespec_fast.models.llama import Transformer
    from pipespec_fast.models.packed import set_compute

    torch.set_num_threads(1)
    path = default_target_dir()
    names = args.paths.split(",")
    models = {}
    for name in names:
        if name not in ("exact", "int8", "fp32"):
            raise SystemExit(f"--paths: unknown path {name!r} (exact, int8, fp32)")
        m = Transformer.from_pretrained(path, packed=name != "fp32")
        set_compute(m, "int8" if name == "int8" else "exact")
        models[name] = m
    prompt = torch.randint(0, 49152, (args.tokens,), generator=torch.Generator().manual_seed(0))
    caches = {name: m.new_cache(args.tokens + 1) for name, m in models.items()}
    print(f"target prefill, {args.tokens}-token prompt, tokens/s (median of {args.reps}, "
          "paths interleaved)\n")
    print("| threads | " + " | ".join(names) + " | "
          + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for threads in (int(t) for t in args.threads.split(",")):
        linear.set_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(args.reps + 1):
            for name, m in models.items():
                c = caches[name]
                c.rollback(0)
                t = time.perf_counter()
                m(prompt, c, last_n=1)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t)
        rate = {name: args.tokens / statistics.median(v) for name, v in times.items()}
        print(f"| {threads} | " + " | ".join(f"{rate[n]:.0f}" for n in names) + " | "
              + " | ".join(f"{rate[n] / rate[names[0]]:.2f}" for n in names[1:]) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
