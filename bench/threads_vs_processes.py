"""Two stage-like workers on CPU: one after the other, as two threads, as two processes.

Each worker runs passes of one-token projections over its own SmolLM2-135M-sized set of fp32
weights (121 matrices, 537 MB) through the engine's CPU matmul (``pipespec_fast.cpu.linear``), one
thread each, as two model stages of a pipeline do. Prints the wall time of each arrangement.

    .venv/bin/python bench/threads_vs_processes.py [--passes 20] [--small]

``--small`` makes the first worker a 10x smaller model (a draft), the realistic pipeline case.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def weights(scale: int):
    import torch

    g = torch.Generator().manual_seed(scale)
    shapes = SHAPES if scale == 1 else [(max(1, o // scale), i) for o, i in SHAPES]
    return [torch.randn(s, generator=g) for s in shapes]


def work(scale: int, passes: int, ready=None, go=None) -> float:
    import torch

    from pipespec_fast.cpu import linear

    torch.set_num_threads(1)
    linear.set_threads(1)
    ws = weights(scale)
    xs = {k: torch.randn(1, k) for k in (576, 1536)}
    for w in ws:  # warm-up (and builds the kernel once)
        linear.linear(xs[w.shape[1]], w)
    if ready is not None:
        ready.wait()
        go.wait()
    t = time.perf_counter()
    for _ in range(passes):
        for w in ws:
            linear.linear(xs[w.shape[1]], w)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    scales = (10 if a.small else 1, 1)

    seq = sum(work(s, a.passes) for s in scales)

    # threads: weights made first, then both start together
    res: list[float] = [0.0, 0.0]
    bar = threading.Barrier(3)
    go = threading.Barrier(3)

    def run(i: int) -> None:
        res[i] = work(scales[i], a.passes, bar, go)

    ths = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    bar.wait()
    t = time.perf_counter()
    go.wait()
    for th in ths:
        th.join()
    thr = time.perf_counter() - t

    ctx = mp.get_context("spawn")
    bar_p, go_p = ctx.Barrier(3), ctx.Barrier(3)
    procs = [ctx.Process(target=work, args=(s, a.passes, bar_p, go_p)) for s in scales]
    for p in procs:
        p.start()
    bar_p.wait()
    t = time.perf_counter()
    go_p.wait()
    for p in procs:
        p.join()
    proc = time.perf_counter() - t
    print(f"workers {'draft(1/10)+target' if a.small else 'target+target'}, {a.passes} passes")
    print(f"one after the other: {seq * 1e3:8.1f} ms")
    print(f"two threads:         {thr * 1e3:8.1f} ms  ({seq / thr:.2f}x)")
    print(f"two processes:       {proc * 1e3:8.1f} ms  ({seq / proc:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
