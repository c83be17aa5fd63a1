"""Prefill speed of the default target: the packed weights (the GEMM's panel path) against fp32
weights (the skinny fp32 GEMM, the path long blocks took before), interleaved in one run.

Both paths run the fused C layer stack; they differ only in the matrices (Q4_1 / Q8_0 blocks
dequantised per panel, or fp32 copies of the same values) and give the same tokens. For each
repetition and thread count, each path prefills the same ``--tokens``-token prompt into an
empty cache (logits of the last token only, as generation does); the table gives the median
tokens/s and the ratio. Timings on a shared machine are noisy: read the ratio.

    .venv/bin/python bench/prefill.py [--tokens 512] [--reps 5] [--threads 1,2]
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
    args = ap.parse_args(argv)

    from pipespec_fast.cpu import linear
    from pipespec_fast.models.defaults import default_target_dir
    from pipespec_fast.models.llama import Transformer

    torch.set_num_threads(1)
    path = default_target_dir()
    models = {"packed": Transformer.from_pretrained(path),
              "fp32": Transformer.from_pretrained(path, packed=False)}
    prompt = torch.randint(0, 49152, (args.tokens,), generator=torch.Generator().manual_seed(0))
    caches = {name: m.new_cache(args.tokens + 1) for name, m in models.items()}
    print(f"target prefill, {args.tokens}-token prompt, tokens/s (median of {args.reps}, "
          "paths interleaved)\n")
    print("| threads | packed | fp32 | packed / fp32 |")
    print("|---|---|---|---|")
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
        print(f"| {threads} | {rate['packed']:.0f} | {rate['fp32']:.0f} | "
              f"{rate['packed'] / rate['fp32']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
