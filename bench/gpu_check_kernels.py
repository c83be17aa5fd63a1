"""The kernel parts of ``gpu_check.py``: each compiled Triton kernel against its torch
reference (attention over chains and trees for SmolLM2-, Llama-3-8B- and 70B-shaped heads in
fp32/fp16/bf16, its split-KV path forced with an int and a tensor ``cache_len``, kv_compact,
greedy and stochastic acceptance), a chi-square of what the stochastic kernel emits, and the
benchmarks: attention (split by the SM-count rule, and unsplit) against
``scaled_dot_product_attention`` as a share of measured memory bandwidth, and acceptance
latency.

The kernels are called directly (``pipespec_fast.kernels``), not through ``ops``, so a dry run
on CPU tensors reaches them through Triton's interpreter exactly as a GPU run does compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gpu_check_common import Section, Sizes, time_ms

from pipespec_fast import reference

# Max abs error against the fp32 reference on the same (rounded) inputs; outputs are convex
# mixes of N(0, 1) values.
ATTN_TOL = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 5e-2}
P_MIN = 1e-3  # chi-square threshold (fixed seeds: the outcome is deterministic)
TREE8 = [-1, -1, -1, 0, 0, 1, 3, 3]  # siblings with their own q at two levels
# (num_splits, min_split) of the forced split checks: at the correctness prefix (777 on a GPU,
# 37 in a dry run) several ranges are used, the last one partial.
SPLIT_CHECK = (5, 16)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def random_tree(n: int, seed: int) -> torch.Tensor:
    """A bushy tree whose branches cross the 32-node mask-word boundary (parents within 8)."""
    g = torch.Generator().manual_seed(seed)
    par = [-1] + [int(torch.randint(max(-1, i - 8), i, (1,), generator=g)) for i in range(1, n)]
    return torch.tensor(par, dtype=torch.int32)


def block_parents(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    return reference.chain_parents(n) if kind == "chain" else random_tree(n, seed)


def _randn(gen, shape, dtype, device):
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def check_attention(sz: Sizes, heads: tuple, dtype: torch.dtype, kind: str, n: int,
                    **split) -> dict:
    """Kernel vs the fp32 reference on the same inputs; the fused append bit for bit.
    ``split``: the launcher's ``num_splits`` / ``min_split`` (default: the kernel's own rule,
    which splits the prefix on a GPU at verify sizes)."""
    from pipespec_fast.kernels.verify_attention import verify_attention

    h, kv, d = heads
    gen = torch.Generator(device=sz.device).manual_seed(n * 131 + d)
    max_len = sz.prefix + n + 3
    q = _randn(gen, (n, d, h), dtype, sz.device).transpose(1, 2)  # non-contiguous on purpose
    k_new, v_new = (_randn(gen, (n, kv, d), dtype, sz.device) for _ in range(2))
    k_cache, v_cache = (_randn(gen, (kv, max_len, d), dtype, sz.device) for _ in range(2))
    bits = reference.ancestor_bits(block_parents(kind, n, seed=n).to(sz.device))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = verify_attention(q, k_new, v_new, kc, vc, sz.prefix, bits, **split)
    want = reference.verify_attention(q.float(), k_new.float(), v_new.float(), k_cache.float(),
                                      v_cache.float(), sz.prefix, bits)
    err = (out.float() - want).abs().max().item()
    appended = (torch.equal(kc[:, sz.prefix:sz.prefix + n], k_new.transpose(0, 1))
                and torch.equal(vc[:, sz.prefix:sz.prefix + n], v_new.transpose(0, 1))
                and torch.equal(kc[:, :sz.prefix], k_cache[:, :sz.prefix]))
    finite = bool(torch.isfinite(out).all())
    return {"ok": err <= ATTN_TOL[dtype] and appended and finite, "max_abs_err": err,
            "tol": ATTN_TOL[dtype], "cache_append_exact": appended, "finite": finite}


def check_attention_split(sz: Sizes, heads: tuple, dtype: torch.dtype, kind: str, n: int,
                          num_splits: int, min_split: int) -> dict:
    """The split path (forced: ``num_splits`` ranges of at least ``min_split`` keys, so several
    are used at ``sz.prefix``) against the fp32 reference, and ``cache_len`` given as a 0-d
    int32 device tensor (the CUDA-graph form) giving the int form's bits. The production key
    tiles on a GPU; 16-key tiles in a dry run, whose prefix is shorter than one 64-key tile."""
    from pipespec_fast.kernels.verify_attention import _tile_sizes, verify_attention

    h, kv, d = heads
    tiles = dict(num_splits=num_splits, min_split=min_split,
                 block_n=None if sz.cuda else 16)
    res = check_attention(sz, heads, dtype, kind, n, **tiles)
    gen = torch.Generator(device=sz.device).manual_seed(n)
    q = _randn(gen, (n, h, d), dtype, sz.device)
    k_new, v_new = (_randn(gen, (n, kv, d), dtype, sz.device) for _ in range(2))
    cache = [_randn(gen, (kv, sz.prefix + n, d), dtype, sz.device) for _ in range(2)]
    bits = reference.ancestor_bits(block_parents(kind, n, seed=n).to(sz.device))
    outs = []
    for cl in (sz.prefix, torch.tensor(sz.prefix, dtype=torch.int32, device=sz.device)):
        outs.append(verify_attention(q, k_new, v_new, cache[0].clone(), cache[1].clone(), cl,
                                     bits, **tiles))
    same = torch.equal(outs[0], outs[1])
    block_n = _tile_sizes(n * (h // kv), d, None, tiles["block_n"])[2]
    split_len = -(-max(-(-sz.prefix // num_splits), min_split) // block_n) * block_n
    used = max(1, -(-sz.prefix // split_len))
    return {**res, "ok": res["ok"] and same, "num_splits": num_splits, "min_split": min_split,
            "splits_used": used, "tensor_cache_len_bit_exact": same}


def check_kv_compact(sz: Sizes, heads: tuple, dtype: torch.dtype) -> dict:
    """A tree path moved down over its own sources, all layers: bit for bit the reference."""
    from pipespec_fast.kernels.kv_rollback import kv_compact

    _, kv, d = heads
    gen = torch.Generator(device=sz.device).manual_seed(d)
    k, v = (_randn(gen, (3, kv, sz.prefix + 40, d), dtype, sz.device) for _ in range(2))
    dst = sz.prefix
    src = torch.tensor([dst + 1, dst + 2, dst + 5, dst + 9, dst + 10, dst + 17, dst + 30],
                       device=sz.device)
    kr, vr, kt, vt = k.clone(), v.clone(), k.clone(), v.clone()
    reference.kv_compact(kr, vr, src, dst)
    kv_compact(kt, vt, src, dst)
    exact = torch.equal(kt, kr) and torch.equal(vt, vr)
    return {"ok": exact, "bit_exact": exact}


def check_greedy_accept(sz: Sizes, kind: str, n: int) -> dict:
    """Tokens from a 3-token vocabulary, so paths of every length occur: the kernel's outputs
    equal the reference's, for 16 random cases."""
    from pipespec_fast.kernels.acceptance import greedy_accept

    par = block_parents(kind, n, seed=n + 1)
    g = torch.Generator().manual_seed(n)
    bad = 0
    for _ in range(16):
        toks, tgt = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n + 1,),
                                                                          generator=g)
        want = reference.greedy_accept(toks, par, tgt)
        got = greedy_accept(toks.to(sz.device), par.to(sz.device), tgt.to(sz.device))
        bad += not all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))
    return {"ok": bad == 0, "cases": 16, "mismatches": bad}


def _accept_problem(sz: Sizes, n: int, seed: int, par: torch.Tensor):
    """Draft rows close to the target's (so drafts are often accepted), drafts drawn from them."""
    g = torch.Generator(device=sz.device).manual_seed(seed)
    tp = torch.softmax(torch.randn(n + 1, sz.vocab, generator=g, device=sz.device) * 3, -1)
    noise = torch.softmax(torch.randn(n, sz.vocab, generator=g, device=sz.device) * 3, -1)
    dp = 0.7 * tp[par.long() + 1] + 0.3 * noise
    toks = reference.sample_from_probs(dp, seed, 0)
    return toks, dp, tp


def check_stochastic_accept(sz: Sizes, kind: str, n: int) -> dict:
    """Draw for draw the reference (on CPU copies), over 4 RNG offsets."""
    from pipespec_fast.kernels.acceptance import stochastic_accept

    par = block_parents(kind, n, seed=n + 2).long()
    toks, dp, tp = _accept_problem(sz, n, n, par.to(sz.device))
    bad, accepted = 0, []
    for offset in range(4):
        want = reference.stochastic_accept(toks.cpu(), par, dp.cpu(), tp.cpu(), 9, offset)
        got = stochastic_accept(toks, par.to(sz.device), dp, tp, 9, offset)
        bad += not all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))
        accepted.append(int(want[1]))
    return {"ok": bad == 0, "offsets": 4, "mismatches": bad, "accepted": accepted,
            "vocab": sz.vocab}


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value (no scipy on the GPU machine): the regularised upper
    incomplete gamma of (df / 2, stat / 2)."""
    expected = probs.double() * counts.sum()
    keep = expected > 0
    stat = ((counts.double()[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         stat / 2.0))


def check_sampling_chi_square(sz: Sizes) -> dict:
    """The first token the stochastic kernel emits follows the verifier's row 0 (a tree whose
    siblings have their own q; V = 8), over ``sz.draws`` draws."""
    from pipespec_fast.kernels.acceptance import stochastic_accept

    V = 8
    g = torch.Generator().manual_seed(21)
    par = torch.tensor(TREE8)
    tp = torch.softmax(torch.randn(len(TREE8) + 1, V, generator=g) * 1.5, -1)
    dp = torch.softmax(torch.randn(len(TREE8), V, generator=g) * 1.5, -1)
    par_d, tp_d, dp_d = par.to(sz.device), tp.to(sz.device), dp.to(sz.device)
    firsts = []
    for b in range(sz.draws):
        toks = reference.sample_from_probs(dp_d, 5, b)
        path, num, nxt = stochastic_accept(toks, par_d, dp_d, tp_d, 5, b)
        path, num, nxt, toks = path.cpu(), int(num), int(nxt), toks.cpu()
        firsts.append(int(toks[path[0]]) if num > 0 else nxt)
    counts = torch.bincount(torch.tensor(firsts), minlength=V)
    p = chi2_pvalue(counts, tp[0])
    return {"ok": p > P_MIN, "p_value": p, "draws": sz.draws, "counts": counts.tolist(),
            "expected": [round(float(x) * sz.draws, 1) for x in tp[0]]}


def kernel_checks(sec: Section, sz: Sizes) -> None:
    """Every correctness case of the kernels. Cheap kernels first, then attention with the
    production dtype and shapes first: on a cold GPU most of the time is Triton compiling
    variants, and the section's budget cuts the tail (recorded as skipped)."""
    for shape, heads in sz.heads.items():
        for dt in sz.dtypes:
            sec.run(f"kv_compact/{shape}/{_dtype_name(dt)}", "correctness", check_kv_compact,
                    sz, heads, dt)
    for kind, n in sz.blocks:
        sec.run(f"greedy_accept/{kind}{n}", "correctness", check_greedy_accept, sz, kind, n)
        sec.run(f"stochastic_accept/{kind}{n}/V{sz.vocab}", "correctness",
                check_stochastic_accept, sz, kind, n)
    for dt in reversed(sz.dtypes):  # bf16 (on a GPU) first
        for shape, heads in sz.heads.items():
            for kind, n in sz.blocks:
                sec.run(f"verify_attention/{shape}/{_dtype_name(dt)}/{kind}{n}", "correctness",
                        check_attention, sz, heads, dt, kind, n)
        if dt is sz.dtypes[-1]:  # the production dtype: the split path forced, every shape
            for shape, heads in sz.heads.items():
                for kind, n in sz.blocks:
                    sec.run(f"verify_attention_split/{shape}/{_dtype_name(dt)}/{kind}{n}",
                            "correctness", check_attention_split, sz, heads, dt, kind, n,
                            *SPLIT_CHECK)
            # ... and the unsplit kernel (prefills and short prefixes run it; at this prefix
            # the kernel's own rule splits on a GPU, so it is forced here)
            for shape, heads in sz.heads.items():
                for kind, n in sz.blocks:
                    sec.run(f"verify_attention_unsplit/{shape}/{_dtype_name(dt)}/{kind}{n}",
                            "correctness", check_attention, sz, heads, dt, kind, n,
                            num_splits=1)


# ----------------------------------------------------------------------------- benchmarks


def measure_bandwidth(sz: Sizes) -> dict:
    """Device-to-device copy of ``sz.copy_bytes``: read + write bytes per second."""
    src = torch.empty(sz.copy_bytes, dtype=torch.uint8, device=sz.device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), sz.device, max(3, sz.iters // 2))
    return {"bytes": sz.copy_bytes, **t,
            "gb_per_s": round(2 * sz.copy_bytes / (t["median_ms"] * 1e-3) / 1e9, 1)}


def _sdpa(q, k_cache, v_cache, prefix, n, mask):
    """The same attention by ``scaled_dot_product_attention`` (GQA by ``enable_gqa``), with the
    block's keys already in the cache."""
    return F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_cache[None, :, :prefix + n], v_cache[None, :, :prefix + n],
        attn_mask=mask, enable_gqa=True)


def bench_attention(sz: Sizes, heads: tuple, dtype: torch.dtype, context: int, n: int,
                    gb_per_s: float | None) -> dict:
    """verify_attention (n = 9 chain) after ``context`` cached tokens against SDPA, both timed
    on the device, and the kernel's share of the measured copy bandwidth (bytes: the K/V it
    must read)."""
    from pipespec_fast.kernels.verify_attention import verify_attention

    h, kv, d = heads
    gen = torch.Generator(device=sz.device).manual_seed(context)
    q = _randn(gen, (n, h, d), dtype, sz.device)
    k_new, v_new = (_randn(gen, (n, kv, d), dtype, sz.device) for _ in range(2))
    k_cache, v_cache = (_randn(gen, (kv, context + n, d), dtype, sz.device) for _ in range(2))
    prefix = context
    bits = reference.ancestor_bits(reference.chain_parents(n, sz.device))
    mask = torch.ones(n, prefix + n, dtype=torch.bool, device=sz.device)
    mask[:, prefix:] = reference.unpack_bits(bits, n)
    from pipespec_fast.kernels.verify_attention import _sm_count, kv_splits

    splits = kv_splits(n, kv, k_cache.shape[1], _sm_count(torch.device(sz.device)))

    def ours_fn(num_splits):
        return lambda: verify_attention(q, k_new, v_new, k_cache, v_cache, prefix, bits,
                                        num_splits=num_splits)

    ours = time_ms(ours_fn(splits), sz.device, sz.iters)
    unsplit = time_ms(ours_fn(1), sz.device, sz.iters)
    sdpa = time_ms(lambda: _sdpa(q, k_cache, v_cache, prefix, n, mask), sz.device, sz.iters)
    # the split path against the reference at this context (a bench of a wrong kernel is void)
    got = verify_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), prefix, bits,
                           num_splits=splits)
    want = reference.verify_attention(q.float(), k_new.float(), v_new.float(), k_cache.float(),
                                      v_cache.float(), prefix, bits)
    err = (got.float() - want).abs().max().item()
    if not err <= ATTN_TOL[dtype]:  # a benchmark of a wrong kernel: an error, not a figure
        raise AssertionError(f"split path off the reference: max abs error {err}")
    kv_bytes = 2 * kv * (prefix + n) * d * torch.finfo(dtype).bits // 8
    out = {"context": context, "n": n, "heads": list(heads), "dtype": _dtype_name(dtype),
           "kv_bytes": kv_bytes, "num_splits": splits, "ours": ours, "ours_unsplit": unsplit,
           "sdpa": sdpa,
           "max_abs_err": err,
           "ours_over_sdpa": round(ours["median_ms"] / max(sdpa["median_ms"], 1e-9), 3),
           "split_speedup": round(unsplit["median_ms"] / max(ours["median_ms"], 1e-9), 3)}
    if gb_per_s:
        achieved = kv_bytes / (ours["median_ms"] * 1e-3) / 1e9
        out["ours_gb_per_s"] = round(achieved, 1)
        out["ours_pct_of_copy_bw"] = round(100 * achieved / gb_per_s, 1)
    return out


def bench_accept(sz: Sizes, kind: str, n: int) -> dict:
    """Latency of one greedy and one stochastic acceptance over the full vocabulary."""
    from pipespec_fast.kernels.acceptance import greedy_accept, stochastic_accept

    par = block_parents(kind, n, seed=3).long().to(sz.device)
    toks, dp, tp = _accept_problem(sz, n, 7, par)
    tgt = toks.new_zeros(n + 1)
    return {"n": n, "kind": kind, "vocab": sz.vocab,
            "greedy": time_ms(lambda: greedy_accept(toks, par, tgt), sz.device, sz.iters),
            "stochastic": time_ms(lambda: stochastic_accept(toks, par, dp, tp, 1, 2), sz.device,
                                  sz.iters)}


def kernel_benchmarks(sec: Section, sz: Sizes) -> None:
    bw = sec.run("hbm_copy_bandwidth", "benchmark", measure_bandwidth, sz)
    gbs = bw["gb_per_s"] if bw else None
    shape = "llama3_8b" if "llama3_8b" in sz.heads else next(iter(sz.heads))
    dt = torch.bfloat16 if torch.bfloat16 in sz.dtypes else torch.float16
    for context in sz.contexts:
        sec.run(f"attention_vs_sdpa/{shape}/{_dtype_name(dt)}/ctx{context}/n9", "benchmark",
                bench_attention, sz, sz.heads[shape], dt, context, 9, gbs)
    for kind, n in (("chain", 9), ("tree", 16)):
        sec.run(f"accept_latency/{kind}{n}/V{sz.vocab}", "benchmark", bench_accept, sz, kind,
                n)


def bytes_per_token_note() -> str:
    """What the bandwidth share means (recorded beside the figures)."""
    return ("ours_pct_of_copy_bw: the K/V bytes verify_attention must read over its device "
            "time, as a share of a device-to-device copy's read+write rate; the goal is >= 80 "
            "at 4k+ context and n = 9 (issue 13)")

