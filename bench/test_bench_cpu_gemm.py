"""CPU fp32 matmuls of one SmolLM2-135M forward: skinny GEMM vs packed weights vs numpy/OpenBLAS
vs torch.

One "pass" is the 121 products ``y = x @ W.T`` of a forward over ``n`` rows: 30 layers of
(960, 576) qkv, (576, 576) o, (3072, 576) gate+up, (576, 1536) down, plus the (49152, 576) head
(random fp32 weights of those shapes, 537 MB, so every pass streams them from DRAM).
``packed``: the same products on the weights quantised as the default GGUF stores them (Q4_1
layers, Q8_0 head; 96 MB), through ``pipespec_fast.cpu.quant`` (fp32 arithmetic on the dequantised
values). ``int8``: the same packed weights through ``pipespec_fast.cpu.int8`` (activations
quantised per 32-value block, integer block dots with AVX-512 VNNI). ``packed-real`` and
``int8-real``: both kernels on the default target's own packed weights (``--real``; the
converted checkpoint's ``packed.safetensors``, its fused QKV and gate/up as the model runs them).
A third gives the weight bytes streamed per second against the read bandwidth measured in the
same run (``read_bandwidth``). A second table gives each variant's multiply-adds per second
against the cores' peak
(``--peak-int8``, ``--peak-fp32``, per core). The defaults were measured on this project's VM
(an AMD EPYC with avx512_vp2intersect, i.e. Zen 5: two 512-bit FMA pipes) with 12 independent
chains of ``vpdpbusd`` / ``vfmadd`` zmm timed by thread CPU time: 533 and 133 GMAC/s per core
(the same 4:1 ratio as the 234 / 58 measured by wall time while other jobs shared the cores).
So compare them with ``--cpu-time`` figures, or expect wall time on a shared machine to reach
only its share of them.

Script mode (interleaved variants, several repetitions, medians; prints a Markdown table)::

    .venv/bin/python bench/test_bench_cpu_gemm.py [--reps 7] [--ns 1,2,4,8,16] [--real]
    .venv/bin/python bench/test_bench_cpu_gemm.py --only packed,int8 --real  # the int8 rows

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
from pipespec_fast.cpu import int8, library, quant  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
N_LAYERS = 30
HEAD_SHAPE = (49152, 576)
NS = (1, 2, 4, 8, 16)
PEAK_GMACS = {"int8": 533.0, "fp32": 133.0}  # per core, vpdpbusd / fp32 FMA zmm (docstring)


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


_REAL: list = []


def real_packed_weights() -> list:
    """The default target's 121 packed matmuls as the model runs them: per layer QKV (rows of
    q, k, v stacked), o, gate/up, down (Q4_1), then the tied head (the embedding's Q8_0 rows).
    Read once from the converted checkpoint (converted on first use)."""
    if not _REAL:
        from pipespec_fast.models import hf_names
        from pipespec_fast.models.checkpoint import load_packed
        from pipespec_fast.models.config import LlamaConfig
        from pipespec_fast.models.defaults import default_target_dir

        folder = default_target_dir()
        cfg = LlamaConfig.from_dir(folder)
        pk = load_packed(folder, cfg)
        groups = [(hf_names.Q, hf_names.K, hf_names.V), (hf_names.O,),
                  (hf_names.GATE, hf_names.UP), (hf_names.DOWN,)]
        for i in range(cfg.n_layers):
            for names in groups:
                parts = [pk[hf_names.layer(i, n)] for n in names]
                _REAL.append(quant.PackedWeight(torch.cat([p.data for p in parts]),
                                                parts[0].kind, parts[0].k))
        _REAL.append(pk[hf_names.HEAD if hf_names.HEAD in pk else hf_names.EMBED])
    return _REAL


def make_pass(kind: str, threads: int, ws: list[torch.Tensor], xs: dict[int, torch.Tensor]):
    """A zero-argument callable running the 121 products once."""
    if kind in ("packed", "int8", "packed-real", "int8-real"):
        pws = real_packed_weights() if kind.endswith("-real") else packed_weights(ws)
        pairs = [(xs[w.k], w) for w in pws]
        fn = int8.int8_linear if kind.startswith("int8") else quant.packed_linear

        def run():
            for x, w in pairs:
                fn(x, w, threads)

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


def variants(n: int, real: bool = False, only: tuple[str, ...] | None = None
             ) -> list[tuple[str, int]]:
    out = []
    if cpu_gemm.available():
        out += [("skinny", 1), ("skinny", 2)]
        if cpu_gemm.set_isa("avx512") == "avx512":  # also show the AVX2-only path
            out += [("skinny-avx2", 1), ("skinny-avx2", 2)]
        cpu_gemm.set_isa("auto")
    if quant.available():
        out += [("packed", 1), ("packed", 2)] + ([("packed-real", 1), ("packed-real", 2)]
                                                 if real else [])
    if int8.available():
        out += [("int8", 1), ("int8", 2)] + ([("int8-real", 1), ("int8-real", 2)] if real else [])
    out += [("numpy", 1), ("numpy", 2)]
    if n == 1:
        out += [("numpy-gemv", 1), ("numpy-gemv", 2)]
    out += [("torch", 1), ("torch", 2)]
    if only:
        out = [v for v in out if v[0].removesuffix("-real") in only]
    return out


@contextmanager
def isa_for(kind: str):
    if kind == "skinny-avx2":
        cpu_gemm.set_isa("avx2")
    try:
        yield
    finally:
        if kind == "skinny-avx2":
            cpu_gemm.set_isa("auto")


def measure(ws, ns=NS, reps: int = 7, gap: float = 0.05, log=print, real: bool = False,
            only: tuple[str, ...] | None = None, cpu_time: bool = False) -> dict:
    """{n: {(kind, threads): [ms per pass, one per repetition]}}, variants interleaved.

    ``cpu_time``: time the 1-thread variants of our kernels by this thread's CPU time (they
    run on the calling thread alone), so other processes on a shared machine delay them less;
    every other variant keeps wall time."""
    results = {}
    for n in ns:
        xs = make_inputs(n)
        vs = variants(n, real, only)
        runs = {v: make_pass(v[0], v[1], ws, xs) for v in vs}
        times = {v: [] for v in vs}
        for _ in range(reps):
            for v in vs:
                with threads_for(v[0], v[1]), isa_for(v[0]):
                    runs[v]()  # warm-up: wakes thread pools, settles the caches
                    clock = time.thread_time if cpu_time and v[1] == 1 and \
                        v[0].removesuffix("-real") in ("packed", "int8", "skinny") \
                        else time.perf_counter
                    t0 = clock()
                    runs[v]()
                    times[v].append((clock() - t0) * 1e3)
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
    ("int8", 1),
    ("int8", 2),
    ("packed-real", 1),
    ("packed-real", 2),
    ("int8-real", 1),
    ("int8-real", 2),
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


def macs_per_pass(ws: list[torch.Tensor], n: int) -> int:
    return n * sum(w.numel() for w in ws)


def cell_table(results: dict, cell) -> str:
    """A Markdown table of ``cell(kind, threads, n, median ms)`` for every variant run."""
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    lines = ["| n | " + " | ".join(f"{k} {t}T" for k, t in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for n, times in results.items():
        cells = [cell(kind, t, n, statistics.median(times[(kind, t)]))
                 if (kind, t) in times else "" for kind, t in cols]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rate_table(results: dict, macs: dict[int, int], peaks: dict[str, float]) -> str:
    """GMAC/s of each variant (median pass) and its share of the cores' peak: the int8 kernel
    against ``vpdpbusd``'s, every fp32 one against the FMA's (per core times threads)."""
    def cell(kind, t, n, ms):
        rate = macs[n] / (ms * 1e-3) / 1e9
        peak = peaks["int8" if kind.startswith("int8") else "fp32"] * t
        return f"{rate:.0f} ({100 * rate / peak:.0f}%)"
    return cell_table(results, cell)


def read_bandwidth(threads: int, mb: int = 512, reps: int = 5) -> float:
    """GB/s of reading a buffer far larger than the caches (``torch.sum`` over fp32 on
    ``threads`` threads, best of ``reps``): the measured ceiling of a weight-streaming pass."""
    buf = torch.ones(mb * 2**20 // 4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf.sum()
        best = min(_timed(buf.sum) for _ in range(reps))
    finally:
        torch.set_num_threads(old)
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bytes_table(results: dict, nbytes: dict[str, int], bw: dict[int, float]) -> str:
    """GB/s of weights streamed per pass (median) and its share of the measured read bandwidth
    for that thread count: where a pass is bound by memory (small n) this nears 100%."""
    def cell(kind, t, n, ms):
        size = nbytes["packed" if kind.startswith(("packed", "int8")) else "fp32"]
        rate = size / (ms * 1e-3) / 1e9
        return f"{rate:.0f} ({100 * rate / bw[t]:.0f}%)"
    return cell_table(results, cell)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--gap", type=float, default=0.05, help="pause between variants (s)")
    ap.add_argument("--real", action="store_true",
                    help="also run packed and int8 on the default target's own packed weights")
    ap.add_argument("--only", default="", help="comma-separated kinds (e.g. packed,int8)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time our 1-thread kernels by thread CPU time (a shared machine)")
    ap.add_argument("--peak-int8", type=float, default=PEAK_GMACS["int8"],
                    help="GMAC/s per core of vpdpbusd")
    ap.add_argument("--peak-fp32", type=float, default=PEAK_GMACS["fp32"],
                    help="GMAC/s per core of fp32 FMA")
    args = ap.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s) or None
    ns = [int(s) for s in args.ns.split(",")]
    load0 = os.getloadavg()
    if load0[0] > 0.5:
        print(f"warning: load average {load0[0]:.2f} before start: timings may be noisy")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"skinny: {cpu_gemm.isa() or 'unavailable (' + str(library.unavailable_reason()) + ')'}"
        f", int8: {int8.isa()}, torch {torch.__version__}, numpy {np.__version__}"
    )
    ws = make_weights()
    gb = sum(w.numel() for w in ws) * 4 / 1e9
    print(f"{len(ws)} matrices, {gb * 1e3:.0f} MB per pass; reps={args.reps}")
    results = measure(ws, ns, args.reps, args.gap, real=args.real, only=only,
                      cpu_time=args.cpu_time)
    load1 = os.getloadavg()
    print(
        f"\nms per pass (median of {args.reps}); load average "
        f"{load0[0]:.2f} before, {load1[0]:.2f} after\n"
    )
    print(table(results))
    print(f"\nGMAC/s per pass (median) and % of peak ({args.peak_int8:g} GMAC/s per core for "
          f"int8, {args.peak_fp32:g} for fp32 FMAs, times threads)\n")
    print(rate_table(results, {n: macs_per_pass(ws, n) for n in ns},
                     {"int8": args.peak_int8, "fp32": args.peak_fp32}))
    bw = {t: read_bandwidth(t) for t in (1, 2)}
    nbytes = {"fp32": sum(w.numel() for w in ws) * 4,
              "packed": sum(pw.data.numel() for pw in packed_weights(ws))}
    print(f"\nGB/s of weights streamed per pass (median; fp32 {nbytes['fp32'] / 1e6:.0f} MB, "
          f"packed {nbytes['packed'] / 1e6:.0f} MB) and % of the measured read bandwidth "
          f"({bw[1]:.1f} GB/s on 1 thread, {bw[2]:.1f} on 2)\n")
    print(bytes_table(results, nbytes, bw))


# ---- pytest-benchmark ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights():
    return make_weights()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["packed", "int8", "skinny", "numpy", "torch"])
@pytest.mark.parametrize("n", NS)
def test_smollm2_pass(benchmark, weights, kind, threads, n):
    if kind == "skinny" and not cpu_gemm.available():
        pytest.skip(f"skinny GEMM unavailable: {library.unavailable_reason()}")
    if kind == "packed" and not quant.available():
        pytest.skip("packed-weight kernel unavailable (needs gcc and AVX-512F/FMA/F16C)")
    if kind == "int8" and not int8.available():
        pytest.skip(f"int8 kernel unavailable: {library.unavailable_reason()}")
    if kind == "numpy" and n == 1:
        kind = "numpy-gemv"  # what linear.py does for one row
    benchmark.group = f"SmolLM2-135M matmuls (121), n={n}"
    benchmark.extra_info["macs_per_pass"] = macs_per_pass(weights, n)
    run = make_pass(kind, threads, weights, make_inputs(n))
    with threads_for(kind, threads):
        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


if __name__ == "__main__":
    main()
