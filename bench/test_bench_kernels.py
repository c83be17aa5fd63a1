"""Kernel micro-benchmarks (pytest-benchmark). Not collected by the default test run.

Run: ``.venv/bin/pytest bench/test_bench_kernels.py --benchmark-only``
(add ``--benchmark-columns=min,median,mean,rounds`` for a compact table; CPU cases run with
``PIPESPEC_TORCH_THREADS`` torch threads, default 1: ``RuntimeConfig.torch_threads``).

Problem sizes follow SmolLM2-135M: 9 query heads, 3 kv heads, head_dim 64, 30 layers.
CPU cases time the torch references (the CPU production path) against the obvious
``scaled_dot_product_attention`` formulation with a materialised mask; CUDA cases time the
Triton kernels (skipped with "needs CUDA" when no device is present).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipespec_fast import config, reference

N_HEADS, KV_HEADS, HEAD_DIM, N_LAYERS = 9, 3, 64, 30
GROUP = N_HEADS // KV_HEADS
PREFIX = 512
VOCAB = 49152
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def cpu_threads():
    """CPU timings use ``PIPESPEC_TORCH_THREADS`` intra-op threads (default 1): reproducible
    on a shared machine, and the same for every implementation compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(config.current().torch_threads)
    yield
    torch.set_num_threads(before)


def tree_parents(n: int) -> torch.Tensor:
    """A binary draft tree: node 0 is the root's only child, node i > 0 hangs under (i-1)//2."""
    return torch.tensor([-1] + [(i - 1) // 2 for i in range(1, n)], dtype=torch.int32)


def attention_problem(n, prefix=PREFIX, dtype=torch.float32, device="cpu", tree=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    max_len = prefix + 64
    q = rnd(n, N_HEADS, HEAD_DIM)
    k_new, v_new = rnd(n, KV_HEADS, HEAD_DIM), rnd(n, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = rnd(KV_HEADS, max_len, HEAD_DIM), rnd(KV_HEADS, max_len, HEAD_DIM)
    parents = (tree_parents(n) if tree else reference.chain_parents(n)).to(device)
    bits = reference.ancestor_bits(parents)
    return q, k_new, v_new, k_cache, v_cache, prefix, bits


def dense_mask(bits, n, prefix):
    mask = torch.ones(n, prefix + n, dtype=torch.bool, device=bits.device)
    mask[:, prefix:] = reference.unpack_bits(bits, n)
    return mask


def sdpa_masked_repeat_kv(q, k_new, v_new, k_cache, v_cache, prefix, mask):
    """Baseline: append, repeat K/V per query head, SDPA with the materialised mask."""
    n = q.shape[0]
    k_cache[:, prefix : prefix + n] = k_new.transpose(0, 1)
    v_cache[:, prefix : prefix + n] = v_new.transpose(0, 1)
    keys = k_cache[:, : prefix + n].repeat_interleave(GROUP, 0)
    vals = v_cache[:, : prefix + n].repeat_interleave(GROUP, 0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask)
    return out.transpose(0, 1)


def sdpa_masked_gqa(q, k_new, v_new, k_cache, v_cache, prefix, mask):
    """Baseline: append, SDPA with ``enable_gqa=True`` and the materialised mask."""
    n = q.shape[0]
    k_cache[:, prefix : prefix + n] = k_new.transpose(0, 1)
    v_cache[:, prefix : prefix + n] = v_new.transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k_cache[:, : prefix + n],
        v_cache[:, : prefix + n],
        attn_mask=mask,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("n", [1, 4, 8, 16])
@pytest.mark.parametrize("impl", ["reference", "sdpa_mask_repeat_kv", "sdpa_mask_gqa"])
def test_cpu_verify_attention(benchmark, impl, n):
    benchmark.group = f"cpu verify_attention n={n} prefix={PREFIX}"
    q, k_new, v_new, k_cache, v_cache, prefix, bits = attention_problem(n, tree=True)
    if impl == "reference":
        fn = lambda: reference.verify_attention(q, k_new, v_new, k_cache, v_cache, prefix, bits)
    else:
        mask = dense_mask(bits, n, prefix)  # materialised once, outside the timing
        base = sdpa_masked_repeat_kv if impl == "sdpa_mask_repeat_kv" else sdpa_masked_gqa
        fn = lambda: base(q, k_new, v_new, k_cache, v_cache, prefix, mask)
    out = benchmark(fn)
    want = reference.verify_attention(q, k_new, v_new, k_cache, v_cache, prefix, bits)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def kv_problem(device="cpu", dtype=torch.float32, max_len=2048):
    gen = torch.Generator().manual_seed(0)
    shape = (N_LAYERS, KV_HEADS, max_len, HEAD_DIM)
    k = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    cache_len = 1000
    src = torch.tensor([0, 2, 5, 9], device=device) + cache_len  # accepted tree path
    return k, v, src, cache_len


def test_cpu_kv_compact_reference(benchmark):
    benchmark.group = "kv_compact 30 layers, path of 4"
    k, v, src, dst = kv_problem()
    benchmark(reference.kv_compact, k, v, src, dst)


def accept_problem(n, tree, device="cpu", V=VOCAB):
    gen = torch.Generator().manual_seed(1)
    parents = (tree_parents(n) if tree else reference.chain_parents(n)).to(torch.int64)
    tp = torch.softmax(torch.randn(n + 1, V, generator=gen) * 3, -1)
    dp = 0.6 * tp[parents + 1] + 0.4 * torch.softmax(torch.randn(n, V, generator=gen) * 3, -1)
    toks = reference.sample_from_probs(dp, 0, 0)
    target_ids = tp.argmax(-1)
    target_ids[parents + 1] = toks  # greedy accepts along the whole first branch
    return [t.to(device) for t in (toks, parents, dp, tp, target_ids)]


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_cpu_greedy_accept_reference(benchmark, shape):
    benchmark.group = "greedy_accept n=16"
    toks, parents, _, _, target_ids = accept_problem(16, shape == "tree")
    benchmark(reference.greedy_accept, toks, parents, target_ids)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_cpu_stochastic_accept_reference(benchmark, shape):
    benchmark.group = f"stochastic_accept n=16 V={VOCAB}"
    toks, parents, dp, tp, _ = accept_problem(16, shape == "tree")
    benchmark(reference.stochastic_accept, toks, parents, dp, tp, 0, 0)


# ----------------------------------------------------------------------------- CUDA


def _sync_call(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


_PEAK_CACHE: dict[str, float] = {}


def measured_copy_bandwidth() -> float:
    """Device-to-device copy bandwidth of a 1 GiB buffer, bytes/s (read + write)."""
    if "copy" not in _PEAK_CACHE:
        a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        _PEAK_CACHE["copy"] = 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)
    return _PEAK_CACHE["copy"]


NOMINAL_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


@NEEDS_CUDA
@pytest.mark.parametrize("prefix", [512, 4096])
@pytest.mark.parametrize("n", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("impl", ["triton", "sdpa_mask_gqa", "flash_attn_chain"])
def test_cuda_verify_attention(benchmark, impl, n, prefix):
    from pipespec_fast.kernels.verify_attention import verify_attention as triton_verify_attention

    benchmark.group = f"cuda verify_attention bf16 n={n} prefix={prefix}"
    q, k_new, v_new, k_cache, v_cache, pre, bits = attention_problem(
        n, prefix, torch.bfloat16, "cuda", tree=impl != "flash_attn_chain"
    )
    if impl == "triton":
        fn = lambda: triton_verify_attention(q, k_new, v_new, k_cache, v_cache, pre, bits)
    elif impl == "sdpa_mask_gqa":
        mask = dense_mask(bits, n, pre)
        fn = lambda: sdpa_masked_gqa(q, k_new, v_new, k_cache, v_cache, pre, mask)
    else:
        flash_attn = pytest.importorskip("flash_attn", reason="needs flash-attn")

        def fn():  # chain only: causal with seqlen_q < seqlen_k is bottom-right aligned
            k_cache[:, pre : pre + n] = k_new.transpose(0, 1)
            v_cache[:, pre : pre + n] = v_new.transpose(0, 1)
            k = k_cache[:, : pre + n].transpose(0, 1)[None]
            v = v_cache[:, : pre + n].transpose(0, 1)[None]
            return flash_attn.flash_attn_func(q[None], k, v, causal=True)[0]

    benchmark(_sync_call(fn))
    elt = q.element_size()
    moved = elt * (2 * KV_HEADS * (pre + n) * HEAD_DIM + 2 * q.numel() + 2 * k_new.numel() * 2)
    achieved = moved / benchmark.stats.stats.median
    benchmark.extra_info["bytes"] = moved
    benchmark.extra_info["achieved_GBps"] = achieved / 1e9
    benchmark.extra_info["copy_peak_GBps"] = measured_copy_bandwidth() / 1e9
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
    if nominal:
        benchmark.extra_info["fraction_of_nominal_peak"] = achieved / nominal


@NEEDS_CUDA
def test_cuda_kv_compact_triton(benchmark):
    from pipespec_fast.kernels.kv_rollback import kv_compact as triton_kv_compact

    benchmark.group = "kv_compact 30 layers, path of 4"
    k, v, src, dst = kv_problem("cuda", torch.bfloat16)
    benchmark(_sync_call(lambda: triton_kv_compact(k, v, src, dst)))
    moved = 2 * 2 * N_LAYERS * KV_HEADS * src.numel() * HEAD_DIM * k.element_size()
    benchmark.extra_info["achieved_GBps"] = moved / benchmark.stats.stats.median / 1e9


@NEEDS_CUDA
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_cuda_greedy_accept_triton(benchmark, shape):
    from pipespec_fast.kernels.acceptance import greedy_accept

    benchmark.group = "greedy_accept n=16"
    toks, parents, _, _, target_ids = accept_problem(16, shape == "tree", "cuda")
    benchmark(_sync_call(lambda: greedy_accept(toks, parents, target_ids)))


@NEEDS_CUDA
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_cuda_stochastic_accept_triton(benchmark, shape):
    from pipespec_fast.kernels.acceptance import stochastic_accept

    benchmark.group = f"stochastic_accept n=16 V={VOCAB}"
    toks, parents, dp, tp, _ = accept_problem(16, shape == "tree", "cuda")
    got = stochastic_accept(toks, parents, dp, tp, 0, 0)
    want = reference.stochastic_accept(*(t.cpu() for t in (toks, parents, dp, tp)), 0, 0)
    # Recorded, not asserted: CPU and GPU logf may differ in the last ulp (see KERNELS.md).
    benchmark.extra_info["matches_cpu_reference"] = all(
        torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True)
    )
    benchmark(_sync_call(lambda: stochastic_accept(toks, parents, dp, tp, 0, 0)))
