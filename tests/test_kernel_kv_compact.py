"""kv_compact: Triton vs reference vs a Python oracle, bit for bit (compiled on CUDA tensors
where CUDA exists, the interpreter on CPU tensors elsewhere: ``kernel_device``)."""

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_device import KERNEL_DTYPES, host, on
from triton_compile import run_compile_script

from pipespec_fast import ops, reference
from pipespec_fast.kernels.kv_rollback import kv_compact as triton_kv_compact


def compact_on_device(fn, k, v, src, dst_start, **kw):
    """``fn`` (in place) on copies of the cache on the kernel device; the result on the CPU."""
    kt, vt = on(k.clone(), v.clone())
    fn(kt, vt, on(src), dst_start, **kw)
    return host((kt, vt))

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_cache(n_layers, kv_heads, max_len, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_layers, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(n_layers, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    return k, v


def oracle(k, v, src, dst_start):
    """Gather every source row first, then write: the overlap-free meaning of the op."""
    k, v = k.clone(), v.clone()
    rows_k = [k[:, :, s].clone() for s in src.tolist()]
    rows_v = [v[:, :, s].clone() for s in src.tolist()]
    for i, (rk, rv) in enumerate(zip(rows_k, rows_v, strict=True)):
        k[:, :, dst_start + i] = rk
        v[:, :, dst_start + i] = rv
    return k, v


@st.composite
def compaction(draw):
    max_len = draw(st.integers(4, 40))
    dst_start = draw(st.integers(0, max_len - 1))
    # Any sorted set of distinct slots >= dst_start has src[i] >= dst_start + i: overlap with
    # the destination range is the common case (a tree's accepted path).
    pool = list(range(dst_start, max_len))
    chosen = draw(
        st.lists(st.sampled_from(pool), min_size=0, max_size=min(len(pool), 12), unique=True)
    )
    src = torch.tensor(sorted(chosen), dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    return max_len, dst_start, src


@SETTINGS
@given(
    case=compaction(),
    n_layers=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 24, 64, 128]),
    dtype=st.sampled_from(KERNEL_DTYPES),
    block_d=st.sampled_from([None, 16]),
    seed=st.integers(0, 1000),
)
def test_triton_equals_reference_bit_for_bit(
    case, n_layers, kv_heads, head_dim, dtype, block_d, seed
):
    max_len, dst_start, src = case
    k, v = make_cache(n_layers, kv_heads, max_len, head_dim, dtype, seed)
    want_k, want_v = oracle(k, v, src, dst_start)
    kr, vr = k.clone(), v.clone()
    reference.kv_compact(kr, vr, src, dst_start)
    kt, vt = compact_on_device(triton_kv_compact, k, v, src, dst_start, block_d=block_d)
    assert torch.equal(kr, want_k) and torch.equal(vr, want_v)
    assert torch.equal(kt, want_k) and torch.equal(vt, want_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_bf16_and_fp32_overlapping_shift(dtype):
    """Reference only for bf16 (the interpreter has no bf16): path shifted down by one."""
    k, v = make_cache(2, 2, 16, 32, dtype, 1)
    src = torch.tensor([4, 5, 6, 9])  # destinations 3..6 overlap sources 4..6
    want_k, want_v = oracle(k, v, src, 3)
    reference.kv_compact(k, v, src, 3)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_triton_strided_cache_view_and_untouched_rest():
    """A cache that is a view of a bigger buffer (strides passed); nothing else changes."""
    big_k, big_v = on(*make_cache(3, 4, 20, 32, torch.float32, 2))
    k, v = big_k[::2, 1:3], big_v[::2, 1:3]  # [2, 2, 20, 32], non-contiguous
    before_k, before_v = host((big_k.clone(), big_v.clone()))
    src = torch.tensor([7, 8, 10, 13])
    want_k, want_v = oracle(*host((k, v)), src, 7)
    triton_kv_compact(k, v, on(src), 7)
    big_k, big_v, k, v = host((big_k, big_v, k, v))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    mask = torch.ones_like(big_k, dtype=torch.bool)
    mask[::2, 1:3] = False
    assert torch.equal(big_k[mask], before_k[mask]) and torch.equal(big_v[mask], before_v[mask])


def test_chain_prefix_in_place_is_a_no_op():
    k, v = make_cache(2, 1, 10, 16, torch.float32, 3)
    kt, vt = compact_on_device(triton_kv_compact, k, v, torch.tensor([2, 3, 4]), 2)
    assert torch.equal(kt, k) and torch.equal(vt, v)


def test_ops_dispatches_to_triton_when_forced(configure):
    configure(backend="triton")
    k, v = make_cache(2, 2, 12, 16, torch.float16, 4)
    src = torch.tensor([5, 6, 8, 11])
    want_k, want_v = oracle(k, v, src, 4)
    k, v = compact_on_device(ops.kv_compact, k, v, src, 4)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("k_cache", lambda a: a.update(k_cache=a["k_cache"][0], v_cache=a["v_cache"][0])),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"][:, :1])),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"].half())),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"].to("meta"))),
        ("src", lambda a: a.update(src=a["src"].float())),
        ("src", lambda a: a.update(src=a["src"][None])),
        ("src", lambda a: a.update(src=a["src"].to("meta"))),
        ("src", lambda a: a.update(src=torch.tensor([6, 5, 9]))),  # not increasing
        ("src", lambda a: a.update(src=torch.tensor([4, 6, 9]))),  # src[0] < dst_start
        ("src", lambda a: a.update(src=torch.tensor([5, 6, 12]))),  # past max_len
        ("dst_start", lambda a: a.update(dst_start=10)),  # 10 + 3 > max_len 12
        ("dst_start", lambda a: a.update(dst_start=-1)),
    ],
)
def test_ops_validation_names_the_argument(name, mutate):
    k, v = make_cache(2, 2, 12, 16, torch.float32, 5)
    args = dict(k_cache=k, v_cache=v, src=torch.tensor([5, 6, 9]), dst_start=5)
    mutate(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.kv_compact(**args)


def test_ops_empty_path_is_a_no_op():
    k, v = make_cache(1, 1, 8, 16, torch.float32, 6)
    kk, vv = k.clone(), v.clone()
    ops.kv_compact(kk, vv, torch.empty(0, dtype=torch.int64), 3)
    assert torch.equal(kk, k) and torch.equal(vv, v)


def test_kernel_compiles_for_sm90_without_a_gpu():
    """PTX + cubin for sm_90 without a device (subprocess: TRITON_INTERPRET=1 is set here)."""
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from pipespec_fast.kernels.kv_rollback import _kv_compact_kernel as k
        for dt, hd in (("fp16", 64), ("bf16", 128), ("fp32", 24)):
            consts = dict(HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd))
            s = {}
            for a in k.arg_names:
                if a in consts:
                    s[a] = "constexpr"
                elif a == "src_ptr":
                    s[a] = "*i64"
                elif a.endswith("_ptr"):
                    s[a] = "*" + dt
                else:
                    s[a] = "i32"
            out = triton.compile(ASTSource(fn=k, signature=s, constexprs=consts),
                                 target=GPUTarget("cuda", 90, 32))
            assert "cubin" in out.asm
        print("OK")
        """
    )
    run_compile_script(script)
