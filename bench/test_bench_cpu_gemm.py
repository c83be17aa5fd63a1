"""CPU fp32 matmuls of one SmolLM2-135M forward: skinny GEMM vs packed weights vs numpy/OpenBLAS
vs torch.

One "pass" is the 121 products ``y = x @ W.T`` of a forward over ``n`` rows: 30 layers of
(960, 576) qkv, (576, 576) o, (3072, 576) gate+up, (576, 1536) down, plus the (49152, 576) head
(random fp32 weights of those shapes, 537 MB, so every pass streams them from DRAM).
``packed``: the same products on the weights quantised as the default GGUF stores them (Q4_1
layers, Q8_0 head; 96 MB), through ``pipespec_fast.cpu.quant`` (fp32 arithmetic on the dequantised
values).

Script mode (interleaved variants, several repetitions, medians; prints a Markdown table)::

    .venv/bin/python bench/test_bench_cpu_gemm.py [--reps 7] [--ns 1,2,4,8,16]

pytest-benchmark mode (not collected by the default test run: ``bench/`` is outside testpaths)::

    .venv/bin/pytest bench/test_bench_cpu_gemm.py --benchmark-only \
        --benchmark-columns=min,median,rounds

Thread hygiene: numpy runs with ``torch.set_num_threads(1)`` (torch's OpenMP threads spinning
next to OpenBLAS' wreck its timings); a short pause between variants lets the previous one's
spinning worker threads go to sleep. On a shared machine check the load average printed with
the table, and repeat when it is high.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipespec_fast.cpu import gemm as cpu_gemm  # noqa: E402
from pipespec_fast.cpu import library, quant  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
N_LAYERS = 30
HEAD_SHAPE = (49152, 576)
NS = (1, 2, 4, 8, 16)


def make_weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen) for _ in range(N_LAYERS) for s in LAYER_SHAPES]
    return ws + [torch.randn(HEAD_SHAPE, generator=gen)]


def make_inputs(n: int, seed: int = 1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + n)
    return {k: torch.randn(n, k, generator=gen) for k in (576, 1536)}


@contextmanager
def threads_for(kind: str, threads: int):
    """torch intra-op threads and OpenBLAS threads for one variant."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads if kind == "torch" else 1)
    try:
        with threadpool_limits(limits=threads if kind.startswith("numpy") else 1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


_PACKED: dict[int, list] = {}


def packed_weights(ws: list[torch.Tensor]) -> list:
    """``ws`` as the default GGUF stores them: Q4_1 layers, Q8_0 head (cached)."""
    if id(ws) not in _PACKED:
        _PACKED[id(ws)] = [
            quant.PackedWeight(quant.quantize(w, quant.Q8_0 if w.shape == HEAD_SHAPE
                                              else quant.Q4_1), quant.Q8_0 if
                               w.shape == HEAD_SHAPE else quant.Q4_1, w.shape[1])
            for w in ws]
    return _PACKED[id(ws)]


def make_pass(kind: str, threads: int, ws: list[torch.Tensor], xs: dict[int, torch.Tensor]):
    """A zero-argument callable running the 121 products once."""
    if kind == "packed":
        pairs = [(xs[w.k], w) for w in packed_weights(ws)]

        def run():
            for x, w in pairs:
                quant.packed_linear(x, w, threads)

    elif kind in ("skinny", "skinny-avx2"):
        pairs = [(xs[w.shape[1]], w) for w in ws]

        def run():
            for x, w in pairs:
                cpu_gemm.skinny_linear(x, w, threads)

    elif kind == "numpy":  # x @ W.T (OpenBLAS sgemm, or its GEMV path for n = 1)
        pairs = [(xs[w.shape[1]].numpy(), w.numpy()) for w in ws]

        def run():
            for x, w in pairs:
                np.matmul(x, w.T)

    elif kind == "numpy-gemv":  # W @ x (sgemv on the row-major weight; n = 1 only)
        pairs = [(xs[w.shape[1]].numpy()[0], w.numpy()) for w in ws]

        def run():
            for x, w in pairs:
                np.matmul(w, x)

    elif kind == "torch":
        pairs = [(xs[w.shape[1]], w) for w in ws]

        def run():
            with torch.inference_mode():
                for x, w in pairs:
                    F.linear(x, w)

    else:
        raise ValueError(kind)
    return run


def variants(n: int) -> list[tuple[str, int]]:
    out = []
    if cpu_gemm.available():
        out += [("skinny", 1), ("skinny", 2)]
        if cpu_gemm.set_isa("avx512") == "avx512":  # also show the AVX2-only path
            out += [("skinny-avx2", 1), ("skinny-avx2", 2)]
        cpu_gemm.set_isa("auto")
    if quant.available():
        out += [("packed", 1), ("packed", 2)]
    out += [("numpy", 1), ("numpy", 2)]
    if n == 1:
        out += [("numpy-gemv", 1), ("numpy-gemv", 2)]
    return out + [("torch", 1), ("torch", 2)]


@contextmanager
def isa_for(kind: str):
    if kind == "skinny-avx2":
        cpu_gemm.set_isa("avx2")
    try:
        yield
    finally:
        if kind == "skinny-avx2":
            cpu_gemm.set_isa("auto")


def measure(ws, ns=NS, reps: int = 7, gap: float = 0.05, log=print) -> dict:
    """{n: {(kind, threads): [ms per pass, one per repetition]}}, variants interleaved."""
    results = {}
    for n in ns:
        xs = make_inputs(n)
        vs = variants(n)
        runs = {v: make_pass(v[0], v[1], ws, xs) for v in vs}
        times = {v: [] for v in vs}
        for _ in range(reps):
            for v in vs:
                with threads_for(v[0], v[1]), isa_for(v[0]):
                    runs[v]()  # warm-up: wakes thread pools, settles the caches
                    t0 = time.perf_counter()
                    runs[v]()
                    times[v].append((time.perf_counter() - t0) * 1e3)
                time.sleep(gap)  # let spinning worker threads of this variant go idle
        results[n] = times
        log(
            f"n={n}: "
            + ", ".join(f"{k}/{t}T {statistics.median(ts):.1f}" for (k, t), ts in times.items()),
        )
    return results


COLUMNS = [
    ("packed", 1),
    ("packed", 2),
    ("skinny", 1),
    ("skinny", 2),
    ("skinny-avx2", 1),
    ("skinny-avx2", 2),
    ("numpy", 1),
    ("numpy", 2),
    ("numpy-gemv", 1),
    ("numpy-gemv", 2),
    ("torch", 1),
    ("torch", 2),
]


def table(results: dict) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    head = "| n | " + " | ".join(f"{k} {t}T" for k, t in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for n, times in results.items():
        cells = [f"{statistics.median(times[c]):.1f}" if c in times else "" for c in cols]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--gap", type=float, default=0.05, help="pause between variants (s)")
    args = ap.parse_args(argv)
    ns = [int(s) for s in args.ns.split(",")]
    load0 = os.getloadavg()
    if load0[0] > 0.5:
        print(f"warning: load average {load0[0]:.2f} before start: timings may be noisy")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"skinny: {cpu_gemm.isa() or 'unavailable (' + str(library.unavailable_reason()) + ')'}"
        f", torch {torch.__version__}, numpy {np.__version__}"
    )
    ws = make_weights()
    gb = sum(w.numel() for w in ws) * 4 / 1e9
    print(f"{len(ws)} matrices, {gb * 1e3:.0f} MB per pass; reps={args.reps}")
    results = measure(ws, ns, args.reps, args.gap)
    load1 = os.getloadavg()
    print(
        f"\nms per pass (median of {args.reps}); load average "
        f"{load0[0]:.2f} before, {load1[0]:.2f} after\n"
    )
    print(table(results))


# ---- pytest-benchmark ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights():
    return make_weights()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["packed", "skinny", "numpy", "torch"])
@pytest.mark.parametrize("n", NS)
def test_smollm2_pass(benchmark, weights, kind, threads, n):
    if kind == "skinny" and not cpu_gemm.available():
        pytest.skip(f"skinny GEMM unavailable: {library.unavailable_reason()}")
    if kind == "packed" and not quant.available():
        pytest.skip("packed-weight kernel unavailable (needs gcc and AVX-512F/FMA/F16C)")
    if kind == "numpy" and n == 1:
        kind = "numpy-gemv"  # what linear.py does for one row
    benchmark.group = f"SmolLM2-135M matmuls (121), n={n}"
    run = make_pass(kind, threads, weights, make_inputs(n))
    with threads_for(kind, threads):
        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


if __name__ == "__main__":
    main()
