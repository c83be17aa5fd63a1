"""torch.ops.pipespec.*: registration, fake (meta) kernels, opcheck, torch.compile."""

import shutil

import pytest
import torch
from kernel_device import call, host, on
from torch._subclasses.fake_tensor import FakeTensorMode

import pipespec_fast.custom_ops  # noqa: F401  (registers torch.ops.pipespec.*)
from pipespec_fast import ops, reference

# torch.library.opcheck goes through torch internals that still call torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

OPS = ("verify_attention", "kv_compact", "greedy_accept", "stochastic_accept")


def attention_args(n=4, kv=2, group=3, d=16, prefix=5, max_len=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, kv * group, d, generator=gen)
    k_new, v_new = torch.randn(n, kv, d, generator=gen), torch.randn(n, kv, d, generator=gen)
    k_cache = torch.randn(kv, max_len, d, generator=gen)
    v_cache = torch.randn(kv, max_len, d, generator=gen)
    bits = reference.ancestor_bits(torch.tensor([-1, 0, 0, 1][:n]))
    return q, k_new, v_new, k_cache, v_cache, prefix, bits


def accept_args(V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    parents = torch.tensor([-1, 0, 0, 1])
    dp = torch.softmax(torch.randn(4, V, generator=gen), -1)
    tp = torch.softmax(torch.randn(5, V, generator=gen), -1)
    toks = reference.sample_from_probs(dp, 3, 4)
    return toks, parents, dp, tp


def test_ops_are_registered():
    for name in OPS:
        assert hasattr(torch.ops.pipespec, name), name


def test_verify_attention_op_matches_ops_entry_and_mutates_cache():
    args = attention_args()
    q, k_new, v_new, k_cache, v_cache, prefix, bits = args
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out = torch.ops.pipespec.verify_attention(q, k_new, v_new, kc1, vc1, prefix, bits)
    want = ops.verify_attention(q, k_new, v_new, kc2, vc2, prefix, bits)
    assert torch.equal(out, want) and out.is_contiguous()
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert torch.equal(kc1[:, prefix : prefix + 4], k_new.transpose(0, 1))


def test_kv_compact_op_mutates_in_place():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen)
    k2, v2 = k.clone(), v.clone()
    src = torch.tensor([4, 6, 7])
    assert torch.ops.pipespec.kv_compact(k, v, src, 3) is None
    reference.kv_compact(k2, v2, src, 3)
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_accept_ops_match_reference():
    toks, parents, dp, tp = accept_args()
    target = torch.tensor([toks[0].item(), toks[1].item(), 1, 2, 3])
    got = torch.ops.pipespec.greedy_accept(toks, parents, target)
    want = reference.greedy_accept(toks, parents, target)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for offset in range(6):
        got = torch.ops.pipespec.stochastic_accept(toks, parents, dp, tp, 3, offset)
        want = reference.stochastic_accept(toks, parents, dp, tp, 3, offset)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_ops_validation_propagates_value_error():
    toks, parents, dp, tp = accept_args()
    with pytest.raises(ValueError, match=r"^parents\b"):
        torch.ops.pipespec.greedy_accept(toks, torch.tensor([-1, 3, 0, 1]), toks.new_zeros(5))
    q, k_new, v_new, k_cache, v_cache, _, bits = attention_args()
    with pytest.raises(ValueError, match=r"^cache_len\b"):
        torch.ops.pipespec.verify_attention(q, k_new, v_new, k_cache, v_cache, 13, bits)


def test_ops_with_triton_backend(configure):
    """The custom ops reach the Triton kernels (compiled on CUDA, the interpreter on CPU
    tensors elsewhere) when forced."""
    configure(backend="triton")
    q, k_new, v_new, k_cache, v_cache, prefix, bits = attention_args()
    kc_t, vc_t = on(k_cache.clone(), v_cache.clone())
    out = host(torch.ops.pipespec.verify_attention(*on(q, k_new, v_new), kc_t, vc_t, prefix,
                                                   on(bits)))
    configure(backend="reference")
    want = torch.ops.pipespec.verify_attention(
        q, k_new, v_new, k_cache.clone(), v_cache.clone(), prefix, bits
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    configure(backend="triton")
    toks, parents, dp, tp = accept_args()
    got = call(torch.ops.pipespec.stochastic_accept, toks, parents, dp, tp, 3, 1)
    want = reference.stochastic_accept(toks, parents, dp, tp, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fake_tensor_shapes():
    q, k_new, v_new, k_cache, v_cache, prefix, bits = attention_args(d=32)
    toks, parents, dp, tp = accept_args()
    with FakeTensorMode() as mode:
        fq, fk, fv, fkc, fvc, fb = (
            mode.from_tensor(t) for t in (q, k_new, v_new, k_cache, v_cache, bits)
        )
        out = torch.ops.pipespec.verify_attention(fq, fk, fv, fkc, fvc, prefix, fb)
        assert out.shape == q.shape and out.dtype == q.dtype
        ft, fp, fdp, ftp = (mode.from_tensor(t) for t in (toks, parents, dp, tp))
        for res in (
            torch.ops.pipespec.greedy_accept(ft, fp, ft.new_zeros(5)),
            torch.ops.pipespec.stochastic_accept(ft, fp, fdp, ftp, 1, 2),
        ):
            path, num, nxt = res
            assert path.shape == (4,) and num.shape == () and nxt.shape == ()
            assert path.dtype == num.dtype == nxt.dtype == torch.int64
        fk4 = mode.from_tensor(torch.zeros(2, 2, 8, 16))
        torch.ops.pipespec.kv_compact(fk4, fk4.clone(), mode.from_tensor(torch.tensor([3])), 2)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema (declared mutations), fake kernel and AOT-dispatch consistency."""
    if name == "verify_attention":
        args = attention_args()
    elif name == "kv_compact":
        gen = torch.Generator().manual_seed(2)
        args = (
            torch.randn(2, 2, 10, 16, generator=gen),
            torch.randn(2, 2, 10, 16, generator=gen),
            torch.tensor([4, 6, 7]),
            3,
        )
    elif name == "greedy_accept":
        toks, parents, _, _ = accept_args()
        args = (toks, parents, torch.tensor([toks[0].item(), 0, 1, 2, 3]))
    else:
        toks, parents, dp, tp = accept_args()
        args = (toks, parents, dp, tp, 5, 6)
    op = getattr(torch.ops.pipespec, name)
    # opcheck takes one overload; verify_attention has two (int and tensor cache_len)
    torch.library.opcheck(op.default if name == "verify_attention" else op, args)


def test_verify_attention_cache_tensor_overload():
    """``cache_len`` as a 0-d int32 tensor: the eager packet picks the ``cache_tensor``
    overload by itself, the result and the appended cache equal the int form's, and opcheck
    passes on the overload (schema, fake, mutations)."""
    q, k_new, v_new, k_cache, v_cache, prefix, bits = attention_args()
    cl = torch.tensor(prefix, dtype=torch.int32)
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out = torch.ops.pipespec.verify_attention(q, k_new, v_new, kc1, vc1, cl, bits)
    want = torch.ops.pipespec.verify_attention(q, k_new, v_new, kc2, vc2, prefix, bits)
    assert torch.equal(out, want) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert "cache_tensor" in torch.ops.pipespec.verify_attention.overloads()
    torch.library.opcheck(torch.ops.pipespec.verify_attention.cache_tensor,
                          (q, k_new, v_new, k_cache, v_cache, cl, bits))


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile (inductor) on CPU needs a C compiler",
)
def test_torch_compile_fullgraph_with_a_cache_len_tensor():
    """The CUDA-graph form traced whole: the tensor overload named explicitly, one graph for
    two cache lengths (no recompile on the value)."""
    q, k_new, v_new, k_cache, v_cache, _, bits = attention_args()

    def step(q, k_new, v_new, k_cache, v_cache, cl, bits):
        out = torch.ops.pipespec.verify_attention.cache_tensor(q * 0.5, k_new, v_new, k_cache,
                                                               v_cache, cl, bits)
        return out.square().sum(-1)

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for prefix in (5, 7):
        cl = torch.tensor(prefix, dtype=torch.int32)
        kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        got = compiled(q, k_new, v_new, kc1, vc1, cl, bits)
        want = step(q, k_new, v_new, kc2, vc2, cl, bits)
        torch.testing.assert_close(got, want)
        assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert counter.frame_count == 1


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile (inductor) on CPU needs a C compiler",
)
def test_torch_compile_graph_with_custom_ops():
    """Inductor compiles the surrounding torch code; the ops stay opaque calls with declared
    mutations (fullgraph=False is allowed but no break is needed)."""

    def step(q, k_new, v_new, k_cache, v_cache, bits, toks, parents, target):
        out = torch.ops.pipespec.verify_attention(q * 0.5, k_new, v_new, k_cache, v_cache, 5, bits)
        path, num, nxt = torch.ops.pipespec.greedy_accept(toks, parents, target)
        return out.square().sum(-1), path + 1, num, nxt

    q, k_new, v_new, k_cache, v_cache, _, bits = attention_args()
    toks, parents, _, _ = accept_args()
    target = torch.tensor([toks[0].item(), toks[1].item(), 0, 0, 0])
    compiled = torch.compile(step, fullgraph=False)
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    got = compiled(q, k_new, v_new, kc1, vc1, bits, toks, parents, target)
    want = step(q, k_new, v_new, kc2, vc2, bits, toks, parents, target)
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)  # the mutation happened once
