"""Verification attention: reference vs float64 math / SDPA, Triton vs reference (compiled on
CUDA tensors where CUDA exists, the interpreter on CPU tensors elsewhere: ``kernel_device``)."""

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_device import KERNEL_DTYPES, host, on
from triton_compile import run_compile_script

from pipespec_fast import ops, reference
from pipespec_fast.kernels.verify_attention import verify_attention as triton_verify_attention

HEAD_DIMS = (16, 32, 64, 128)
GQA_RATIOS = (1, 3, 4, 8)
# Max abs error vs the float64 oracle, per dtype (outputs are convex mixes of N(0,1) values).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


def random_parents(n: int, gen: torch.Generator, chain: bool) -> torch.Tensor:
    if chain:
        return reference.chain_parents(n)
    par = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n)]
    return torch.tensor(par[:n], dtype=torch.int32)


def dense_mask_python(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask by walking parents (independent of the reference's helpers)."""
    par = parents.tolist()
    n = len(par)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            m[i, j] = True
            j = par[j]
    return m


def make_problem(n, kv_heads, group, head_dim, prefix, max_len, dtype, seed, chain=False):
    gen = torch.Generator().manual_seed(seed)
    h = kv_heads * group

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    # q non-contiguous on purpose: a [n, head_dim, H] buffer seen as [n, H, head_dim].
    q = rnd(n, head_dim, h).transpose(1, 2)
    k_new, v_new = rnd(n, kv_heads, head_dim), rnd(n, kv_heads, head_dim)
    k_cache, v_cache = rnd(kv_heads, max_len, head_dim), rnd(kv_heads, max_len, head_dim)
    parents = random_parents(n, gen, chain)
    return q, k_new, v_new, k_cache, v_cache, prefix, parents


def oracle(q, k_new, v_new, k_cache, v_cache, prefix, parents, scale=None):
    """float64 attention with a dense mask built from ``parents`` (cache not modified)."""
    n, h, d = q.shape
    kv = k_cache.shape[0]
    group = h // kv
    scale = d**-0.5 if scale is None else scale
    keys = torch.cat([k_cache[:, :prefix], k_new.transpose(0, 1)], 1).double()
    vals = torch.cat([v_cache[:, :prefix], v_new.transpose(0, 1)], 1).double()
    keys = keys.repeat_interleave(group, 0)
    vals = vals.repeat_interleave(group, 0)
    s = torch.einsum("nhd,htd->hnt", q.double(), keys) * scale
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = dense_mask_python(parents)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnt,htd->nhd", torch.softmax(s, -1), vals)


def run_both(problem, **kernel_kw):
    q, k_new, v_new, k_cache, v_cache, prefix, parents = problem
    bits = reference.ancestor_bits(parents)
    kc_r, vc_r = k_cache.clone(), v_cache.clone()
    kc_t, vc_t = on(k_cache.clone(), v_cache.clone())
    out_r = reference.verify_attention(q, k_new, v_new, kc_r, vc_r, prefix, bits)
    out_t = triton_verify_attention(*on(q, k_new, v_new), kc_t, vc_t, prefix, on(bits),
                                    **kernel_kw)
    return out_r, host(out_t), (kc_r, vc_r), host((kc_t, vc_t))


def check_cache_append(problem, kc, vc):
    q, k_new, v_new, k_cache, v_cache, prefix, _ = problem
    n = q.shape[0]
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    exp_k[:, prefix : prefix + n] = k_new.transpose(0, 1)
    exp_v[:, prefix : prefix + n] = v_new.transpose(0, 1)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


problem_args = st.tuples(
    st.integers(1, 24),  # n
    st.sampled_from([1, 2]),  # kv_heads
    st.sampled_from(GQA_RATIOS),
    st.sampled_from(HEAD_DIMS),
    st.integers(0, 70),  # prefix
    st.integers(0, 6),  # spare slots after the block
    st.booleans(),  # chain
    st.integers(0, 2**31 - 1),  # seed
)


# ----------------------------------------------------------------------------- reference


@SETTINGS
@given(args=problem_args, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_reference_matches_float64_oracle(args, dtype):
    n, kv, group, d, prefix, spare, chain, seed = args
    problem = make_problem(n, kv, group, d, prefix, prefix + n + spare, dtype, seed, chain)
    q, k_new, v_new, k_cache, v_cache, _, parents = problem
    kc, vc = k_cache.clone(), v_cache.clone()
    out = reference.verify_attention(
        q, k_new, v_new, kc, vc, prefix, reference.ancestor_bits(parents)
    )
    assert out.dtype == dtype and out.shape == q.shape
    want = oracle(q, k_new, v_new, k_cache, v_cache, prefix, parents)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=0)
    check_cache_append(problem, kc, vc)


@SETTINGS
@given(args=problem_args)
def test_reference_matches_sdpa_with_materialised_mask(args):
    n, kv, group, d, prefix, spare, chain, seed = args
    problem = make_problem(n, kv, group, d, prefix, prefix + n + spare, torch.float32, seed, chain)
    q, k_new, v_new, k_cache, v_cache, _, parents = problem
    bits = reference.ancestor_bits(parents)
    out = reference.verify_attention(
        q, k_new, v_new, k_cache.clone(), v_cache.clone(), prefix, bits
    )
    keys = torch.cat([k_cache[:, :prefix], k_new.transpose(0, 1)], 1).repeat_interleave(group, 0)
    vals = torch.cat([v_cache[:, :prefix], v_new.transpose(0, 1)], 1).repeat_interleave(group, 0)
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = dense_mask_python(parents)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys, vals, attn_mask=mask
    ).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_reference_custom_scale_and_single_token():
    problem = make_problem(1, 2, 3, 32, 9, 12, torch.float32, 5)
    q, k_new, v_new, k_cache, v_cache, prefix, parents = problem
    out = reference.verify_attention(
        q,
        k_new,
        v_new,
        k_cache.clone(),
        v_cache.clone(),
        prefix,
        reference.ancestor_bits(parents),
        scale=0.3,
    )
    want = oracle(q, k_new, v_new, k_cache, v_cache, prefix, parents, scale=0.3)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- triton


@SETTINGS
@given(args=problem_args, dtype=st.sampled_from(KERNEL_DTYPES))
def test_triton_matches_reference(args, dtype):
    n, kv, group, d, prefix, spare, chain, seed = args
    problem = make_problem(n, kv, group, d, prefix, prefix + n + spare, dtype, seed, chain)
    # Small tiles so that row blocks, full and partial prefix blocks all occur.
    out_r, out_t, cache_r, cache_t = run_both(problem, block_r=16, block_n=16)
    assert out_t.dtype == dtype and out_t.shape == out_r.shape
    want = oracle(*problem)
    torch.testing.assert_close(out_t.double(), want, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(out_t.float(), out_r.float(), atol=2 * TOL[dtype], rtol=0)
    # The fused append writes exactly what the reference writes, bit for bit.
    assert torch.equal(cache_t[0], cache_r[0]) and torch.equal(cache_t[1], cache_r[1])
    check_cache_append(problem, *cache_t)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_64_node_tree_two_mask_words(dtype):
    """n = 64: bits 32..63 live in word 1 and bit 31 makes words negative int32."""
    gen = torch.Generator().manual_seed(3)
    problem = list(make_problem(64, 1, 4, 16, 33, 100, dtype, 11))
    # A bushy tree with deep branches crossing the 32-node word boundary.
    par = [-1] + [int(torch.randint(max(-1, i - 8), i, (1,), generator=gen)) for i in range(1, 64)]
    problem[6] = torch.tensor(par, dtype=torch.int32)
    assert (reference.ancestor_bits(problem[6]) < 0).any()
    out_r, out_t, cache_r, cache_t = run_both(tuple(problem))
    torch.testing.assert_close(out_t.double(), oracle(*problem), atol=TOL[dtype], rtol=0)
    assert torch.equal(cache_t[0], cache_r[0]) and torch.equal(cache_t[1], cache_r[1])


@pytest.mark.parametrize("prefix", [0, 64, 65])
def test_triton_default_tiles_chain(prefix):
    """Default tile sizes; empty prefix, prefix a multiple of BLOCK_N, and one past it."""
    problem = make_problem(16, 3, 3, 64, prefix, prefix + 16, torch.float32, prefix, chain=True)
    out_r, out_t, cache_r, cache_t = run_both(problem)
    torch.testing.assert_close(out_t.double(), oracle(*problem), atol=2e-5, rtol=0)
    assert torch.equal(cache_t[0], cache_r[0])


def test_triton_odd_head_dim_and_scale():
    """head_dim 24 is padded to a 32-wide tile and masked."""
    problem = make_problem(5, 2, 3, 24, 20, 30, torch.float32, 8)
    q, k_new, v_new, k_cache, v_cache, prefix, parents = problem
    bits = reference.ancestor_bits(parents)
    out = host(triton_verify_attention(
        *on(q, k_new, v_new, k_cache.clone(), v_cache.clone()), prefix, on(bits), 0.2
    ))
    want = oracle(q, k_new, v_new, k_cache, v_cache, prefix, parents, scale=0.2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


def test_ops_dispatches_to_triton_when_forced(configure):
    configure(backend="triton")
    problem = make_problem(6, 2, 4, 32, 10, 20, torch.float32, 4)
    q, k_new, v_new, k_cache, v_cache, prefix, parents = problem
    kc, vc = on(k_cache.clone(), v_cache.clone())
    out = ops.verify_attention(*on(q, k_new, v_new), kc, vc, prefix,
                               on(reference.ancestor_bits(parents)))
    torch.testing.assert_close(host(out).double(), oracle(*problem), atol=2e-5, rtol=0)
    check_cache_append(problem, *host((kc, vc)))


# ----------------------------------------------------------------------------- split over KV


# (n, kv_heads, group, prefix, tree, num_splits): chains and trees, GQA 1/3/4, empty / small /
# not-a-multiple-of-the-block prefixes, n from 1 to 64 (two mask words); min_split 16 and
# BLOCK_N 16 so that full, partial and unused splits all occur.
SPLIT_CASES = [
    (1, 2, 4, 0, False, 3),
    (1, 1, 3, 5, False, 4),
    (1, 2, 1, 100, False, 5),
    (2, 1, 4, 47, True, 2),
    (9, 2, 4, 97, False, 4),
    (9, 1, 3, 64, True, 3),
    (16, 2, 1, 33, True, 6),
    (33, 1, 4, 70, True, 3),
    (64, 1, 1, 129, True, 4),
    (64, 2, 3, 17, False, 2),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, kv, group, prefix, tree, splits", SPLIT_CASES)
def test_split_kv_matches_oracle(n, kv, group, prefix, tree, splits, dtype):
    problem = list(make_problem(n, kv, group, 16, prefix, prefix + n + 5, dtype, n + prefix,
                                chain=not tree))
    if tree and n > 32:  # branches crossing the 32-node word boundary
        gen = torch.Generator().manual_seed(n)
        problem[6] = torch.tensor(
            [-1] + [int(torch.randint(max(-1, i - 8), i, (1,), generator=gen))
                    for i in range(1, n)], dtype=torch.int32)
    problem = tuple(problem)
    out_r, out_t, cache_r, cache_t = run_both(problem, block_n=16, num_splits=splits,
                                              min_split=16)
    torch.testing.assert_close(out_t.double(), oracle(*problem), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(out_t.float(), out_r.float(), atol=2 * TOL[dtype], rtol=0)
    assert torch.equal(cache_t[0], cache_r[0]) and torch.equal(cache_t[1], cache_r[1])


@pytest.mark.parametrize("splits", [1, 3])
def test_cache_len_tensor_equals_int_bit_for_bit(splits):
    """A 0-d int32 device tensor (the CUDA-graph form) gives the int form's bits, output and
    appended cache alike, through the launcher and through ``ops``."""
    problem = make_problem(7, 2, 3, 16, 50, 64, torch.float32, 3)
    q, k_new, v_new, k_cache, v_cache, prefix, parents = problem
    bits = on(reference.ancestor_bits(parents))
    outs, caches = [], []
    for cl in (prefix, on(torch.tensor(prefix, dtype=torch.int32))):
        kc, vc = on(k_cache.clone(), v_cache.clone())
        outs.append(host(triton_verify_attention(*on(q, k_new, v_new), kc, vc, cl, bits,
                                                 block_n=16, num_splits=splits, min_split=16)))
        caches.append(host((kc, vc)))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    kc, vc = k_cache.clone(), v_cache.clone()
    ref = ops.verify_attention(q, k_new, v_new, kc, vc, torch.tensor(prefix, dtype=torch.int32),
                               reference.ancestor_bits(parents))
    torch.testing.assert_close(ref.double(), oracle(*problem), atol=2e-5, rtol=0)
    check_cache_append(problem, kc, vc)


@pytest.mark.parametrize("prefix", [0, 7, 16])
def test_one_used_split_gives_the_unsplit_bits(prefix):
    """A prefix within ``min_split`` uses one range: merging it is exact (``acc * 0 + acc_s *
    1``), so the split launch equals the unsplit one bit for bit (which is why the launcher
    skips the split for a short host-int ``cache_len``)."""
    problem = make_problem(9, 2, 4, 16, prefix, prefix + 12, torch.float32, prefix, chain=False)
    q, k_new, v_new, k_cache, v_cache, _, parents = problem
    bits = on(reference.ancestor_bits(parents))
    outs = [host(triton_verify_attention(*on(q, k_new, v_new, k_cache.clone(), v_cache.clone()),
                                         prefix, bits, block_n=16, num_splits=s, min_split=16))
            for s in (1, 4)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("splits", [1, 4])
def test_rows_do_not_depend_on_the_block_size(splits):
    """Batch invariance: node i of a chain verified in a block of n equals, bit for bit, the
    last node of the block of its first i + 1 nodes (same prefix, same split layout)."""
    n, prefix = 12, 90
    problem = make_problem(n, 2, 4, 16, prefix, prefix + n, torch.float32, 9, chain=True)
    q, k_new, v_new, k_cache, v_cache, _, _ = problem

    def rows(m):
        bits = on(reference.chain_ancestor_bits(m))
        return host(triton_verify_attention(
            *on(q[:m], k_new[:m], v_new[:m], k_cache.clone(), v_cache.clone()), prefix, bits,
            block_n=16, num_splits=splits, min_split=16))

    full = rows(n)
    for m in (1, 2, 5, 9):
        assert torch.equal(rows(m)[m - 1], full[m - 1]), m


def test_split_count_rule():
    """One wave at the smallest block, from shapes only: never from n (within a verify block)
    or cache_len."""
    from pipespec_fast.kernels.verify_attention import kv_splits

    assert kv_splits(9, 8, 8192, 132) == 17  # Llama-3-8B on an H100/H200
    assert kv_splits(1, 8, 8192, 132) == kv_splits(64, 8, 8192, 132) == 17
    assert kv_splits(9, 3, 16384, 132) == 44  # SmolLM2
    assert kv_splits(9, 3, 8192, 132) == 32  # a split reads at least 256 keys
    assert kv_splits(9, 8, 1024, 132) == 4
    assert kv_splits(9, 8, 100, 132) == 1
    assert kv_splits(65, 8, 8192, 132) == 1  # prefill: enough programs, no partial rows
    assert kv_splits(9, 160, 8192, 132) == 1  # the unsplit grid already fills the GPU
    assert kv_splits(9, 8, 8192, None) == 1  # no GPU (the interpreter)


def test_ops_checks_a_tensor_cache_len():
    args = _good()
    args["cache_len"] = torch.tensor(5)  # int64
    with pytest.raises(ValueError, match=r"^cache_len\b.*0-d int32"):
        ops.verify_attention(**args)
    args["cache_len"] = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^cache_len\b"):
        ops.verify_attention(**args)
    args["cache_len"] = torch.tensor(9, dtype=torch.int32)  # 9 + 4 > max_len 12
    with pytest.raises(ValueError, match=r"^cache_len\b.*exceeds"):
        ops.verify_attention(**args)
    args["cache_len"] = torch.tensor(5, dtype=torch.int32).to("meta")
    with pytest.raises(ValueError, match=r"^cache_len\b.*on meta"):
        ops.verify_attention(**args)


# ----------------------------------------------------------------------------- validation


def _good():
    q, k_new, v_new, k_cache, v_cache, prefix, parents = make_problem(
        4, 2, 3, 16, 5, 12, torch.float32, 0
    )
    return dict(
        q=q,
        k_new=k_new,
        v_new=v_new,
        k_cache=k_cache,
        v_cache=v_cache,
        cache_len=prefix,
        anc_bits=reference.ancestor_bits(parents),
    )


@pytest.mark.parametrize(
    "arg,name,bad",
    [
        ("q", "q", lambda a: a["q"][0]),
        ("k_cache", "k_cache", lambda a: a["k_cache"][0]),
        ("v_cache", "v_cache", lambda a: a["v_cache"][:, :5]),
        ("q", "k_cache", lambda a: a["q"][..., :8]),  # head_dim of q != the cache's
        ("q", "q", lambda a: a["q"][:, :5]),  # 5 query heads for 2 kv heads
        ("k_new", "k_new", lambda a: a["k_new"][:3]),
        ("v_new", "v_new", lambda a: a["v_new"][:, :1]),
        ("k_new", "k_new", lambda a: a["k_new"].to("meta")),
        ("anc_bits", "anc_bits", lambda a: a["anc_bits"].to("meta")),
        ("v_cache", "v_cache", lambda a: a["v_cache"].double()),
        ("anc_bits", "anc_bits", lambda a: a["anc_bits"].long()),
        ("anc_bits", "anc_bits", lambda a: a["anc_bits"][:3]),
        ("cache_len", "cache_len", lambda a: 9),  # 9 + 4 > max_len 12: overflow
        ("cache_len", "cache_len", lambda a: -1),
    ],
)
def test_ops_validation_names_the_argument(arg, name, bad):
    args = _good()
    args[arg] = bad(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.verify_attention(**args)


def test_ops_rejects_integer_q():
    args = _good()
    for k in ("q", "k_new", "v_new", "k_cache", "v_cache"):
        args[k] = args[k].to(torch.int32)
    with pytest.raises(ValueError, match=r"^q\b"):
        ops.verify_attention(**args)


# ----------------------------------------------------------------------------- AOT compile


def test_kernel_compiles_for_sm80_and_sm90_without_a_gpu():
    """Front end + PTX + cubin for sm_80 and sm_90 (no device needed) with the launcher's
    tiles and warps: the unsplit kernel, the split kernel and its combine, with ``cache_len``
    as an int and as a device pointer. Catches compile-only errors the interpreter cannot
    see; checks that ``n`` and ``cache_len`` are not specialised on, and (ptxas -v) that no
    bf16/fp16 variant spills registers on sm_90. Runs in a subprocess because
    TRITON_INTERPRET=1 is set here."""
    script = textwrap.dedent(
        """
        import os, re, subprocess, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import compiler as NC
        from triton.compiler import ASTSource
        from pipespec_fast.kernels import verify_attention as V

        def sig(k, consts, dt, split, len_ptr):
            s = {}
            for a in k.arg_names:
                if a in consts:
                    s[a] = "constexpr"
                elif a == "anc_ptr" or (a == "cache_len" and len_ptr):
                    s[a] = "*i32"
                elif a in ("ml_ptr", "part_ptr") or (a == "out_ptr" and split
                                                      and k is V._verify_attention_kernel):
                    s[a] = "*fp32"
                elif a.endswith("_ptr"):
                    s[a] = "*" + dt
                elif a == "qk_scale":
                    s[a] = "fp32"
                else:
                    s[a] = "i32"
            return s

        def spills(ptx, arch):
            exe = NC.get_ptxas(arch)
            exe = getattr(exe, "path", exe)
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
                res = subprocess.run([exe, "-v", f"--gpu-name={gpu}", src, "-o",
                                      os.path.join(d, "k.o")], capture_output=True, text=True)
            regs = int(re.search(r"Used (\\d+) registers", res.stderr).group(1))
            m = re.search(r"(\\d+) bytes spill stores", res.stderr)
            return regs, int(m.group(1)) if m else 0

        for k in (V._verify_attention_kernel, V._combine_kernel):
            fixed = {p.name for p in k.params if p.do_not_specialize}
            assert {"n", "cache_len"} <= fixed, fixed
        for arch in (80, 90):
            for dt, hd, group, split, len_ptr, aligned in (
                ("fp32", 64, 3, False, False, False), ("fp16", 128, 1, True, False, False),
                ("bf16", 128, 4, True, True, False), ("bf16", 64, 3, True, True, False),
                ("bf16", 24, 8, False, True, False),
                ("bf16", 128, 4, True, True, True), ("fp32", 64, 3, False, True, True),
            ):
                block_r, block_d, block_n = V._tile_sizes(16, hd, None, None)
                consts = dict(GROUP=group, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_N=block_n,
                              LEN_PTR=len_ptr, ALIGNED=aligned)
                kernels = [(V._verify_attention_kernel, V.ATTENTION_WARPS, dict(
                    consts, BLOCK_R=block_r, DOT_PREC="ieee" if dt == "fp32" else "tf32",
                    SPLIT=split))]
                if split:
                    kernels.append((V._combine_kernel, 4, dict(consts, BLOCK_R=V.COMBINE_ROWS)))
                for k, warps, c in kernels:
                    src = ASTSource(fn=k, signature=sig(k, c, dt, split, len_ptr), constexprs=c)
                    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                         options=dict(num_warps=warps))
                    assert "cubin" in out.asm, (arch, dt, k)
                    regs, spill = spills(out.asm["ptx"], arch)
                    print(arch, k.__name__, dt, hd, split, aligned, regs, spill,
                          out.metadata.shared)
                    if arch == 90 and dt != "fp32":
                        assert spill == 0, (k.__name__, dt, hd, regs, spill)
        print("OK")
        """
    )
    run_compile_script(script)


@pytest.mark.parametrize("prefix, n, chain", [(0, 5, True), (37, 1, True), (16, 9, False)])
def test_slots_past_the_block_are_never_read(prefix, n, chain):
    """KV caches are allocated uninitialised (``kv_cache.KVCache``): NaN in every slot past
    ``prefix + n`` (and in the block's own slots before the append) leaves both the reference
    and the Triton kernel's output as with finite garbage there, bit for bit."""
    q, k_new, v_new, k_cache, v_cache, _, parents = make_problem(
        n, 2, 3, 64, prefix, prefix + n + 40, torch.float32, 11, chain)
    nan_k, nan_v = k_cache.clone(), v_cache.clone()
    nan_k[:, prefix:], nan_v[:, prefix:] = float("nan"), float("nan")
    bits = reference.ancestor_bits(parents)
    for fn in (reference.verify_attention, triton_verify_attention):
        clean = fn(q, k_new, v_new, k_cache.clone(), v_cache.clone(), prefix, bits)
        dirty = fn(q, k_new, v_new, nan_k.clone(), nan_v.clone(), prefix, bits)
        assert torch.isfinite(clean).all() and torch.equal(clean, dirty)
