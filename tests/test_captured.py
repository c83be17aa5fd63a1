"""Captured steps (``decoding/captured.py``): the bucketed, padded static step gives the eager
unpadded forward's logits and cache bit for bit on CPU (chains, trees, subset models), the same
step traces whole under ``torch.compile(fullgraph=True)`` without recompiling for another cache
length, and stages using it generate the same tokens. The CUDA-graph capture itself runs only
where CUDA exists (here: skipped; ``bench/gpu_check_models.py`` measures it on a GPU)."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny import family, subset_draft

from pipespec_fast import FastPipeline, LlamaStage, reference
from pipespec_fast.decoding.captured import StaticSteps, _Bucket, buckets, static_step

# torch.library.opcheck goes through torch internals that still call torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

VOCAB = 96


def model(seed: int = 0, **kw):
    m = family(1, seed=seed, vocab=VOCAB, dim=64, n_heads=4, n_kv_heads=2, **kw)[0]
    m.use_fused = False  # the torch layers: what runs on CUDA, and what the step reuses
    return m


def two_caches(m, prefix: int, max_len: int = 200):
    """Two caches holding the same ``prefix`` tokens; the slots past them are NaN, so a read
    of an unwritten slot (or a padding row's) shows in the logits."""
    caches = []
    for _ in range(2):
        c = m.new_cache(max_len)
        c.k.fill_(float("nan"))
        c.v.fill_(float("nan"))
        caches.append(c)
    toks = torch.randint(0, VOCAB, (prefix,), generator=torch.Generator().manual_seed(prefix))
    for c in caches:
        m(toks.to(c.k.device), c)
    return caches


def random_parents(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in
                                range(1, n)])


def assert_same(m, eager, steps, n, parents=None, last_n=None, seed=0):
    """One block through the eager forward and the captured step: bit-identical logits, the
    same cache length and the same valid cache slots."""
    toks = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    want = m(toks, eager, parents=parents, last_n=last_n)
    got = steps.forward(toks, parents=parents, last_n=last_n)
    assert got.shape == want.shape and torch.equal(got, want), (got - want).abs().max()
    c = steps.cache
    assert c.length == eager.length
    assert torch.equal(c.k[:, :, : c.length], eager.k[:, :, : c.length])
    assert torch.equal(c.v[:, :, : c.length], eager.v[:, :, : c.length])


def test_buckets_are_powers_of_two_up_to_the_cap():
    assert buckets() == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets(1) == (1,)
    steps = StaticSteps(model(), model().new_cache(100), max_n=16)
    assert [steps.bucket_for(n) for n in (1, 2, 3, 9, 16, 17)] == [1, 2, 4, 16, 16, None]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 31, 33, 64])
def test_padded_chain_step_equals_the_eager_forward(n):
    m = model()
    eager, cache = two_caches(m, 37)
    steps = StaticSteps(m, cache, capture=False)
    assert_same(m, eager, steps, n, seed=n)
    assert_same(m, eager, steps, 1, seed=99)  # a decode step after it, in another bucket
    assert_same(m, eager, steps, n, last_n=1, seed=7)  # the last row only
    assert steps.replays == 3


@pytest.mark.parametrize("n", [4, 12, 40])
def test_padded_tree_step_equals_the_eager_forward(n):
    m = model(seed=1)
    eager, cache = two_caches(m, 21)
    steps = StaticSteps(m, cache, capture=False)
    for seed in range(3):
        parents = random_parents(n, seed)
        start = eager.length
        assert_same(m, eager, steps, n, parents=parents, seed=seed)
        eager.rollback(start)
        cache.rollback(start)
    # a chain in the same bucket after the trees: the bucket's chain layout comes back
    assert_same(m, eager, steps, n, seed=5)


def test_subset_draft_and_tied_head():
    base = model(seed=2, tie=True)
    m = subset_draft(base, list(range(0, VOCAB, 3)))
    m.use_fused = False
    eager, cache = two_caches(m, 9)
    steps = StaticSteps(m, cache, capture=False)
    assert_same(m, eager, steps, 6, seed=1)
    assert_same(m, eager, steps, 1, seed=2)


def test_padded_step_through_the_triton_kernel(configure):
    """The kernel CUDA runs (compiled where CUDA exists, else in Triton's interpreter:
    ``kernel_device``) takes the length as a tensor and masks the padding rows out of the real
    ones: close to the eager unpadded forward (its tiles follow the block's size, so not bit
    for bit)."""
    from kernel_device import CHOICE

    configure(backend="triton", triton_interpret=CHOICE.interpret)
    m = model(seed=4).to(CHOICE.device)
    eager, cache = two_caches(m, 11)
    steps = StaticSteps(m, cache, capture=False)
    for n, parents in ((5, None), (12, random_parents(12, 3)), (1, None)):
        toks = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
        toks = toks.to(CHOICE.device)
        parents = None if parents is None else parents.to(CHOICE.device)
        want = m(toks, eager, parents=parents)
        got = steps.forward(toks, parents=parents)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert cache.length == eager.length
        torch.testing.assert_close(cache.k[:, :, : cache.length], eager.k[:, :, : eager.length])


def test_graphs_setting_applies_to_cuda_stages_only(configure):
    configure(graphs=True)
    assert LlamaStage(model(), max_len=64).steps is None  # the CPU keeps its fused C path


def test_a_block_that_does_not_fit_is_refused_and_the_cache_is_unchanged():
    m = model()
    eager, cache = two_caches(m, 10, max_len=16)
    steps = StaticSteps(m, cache, capture=False, max_n=8)
    assert steps.fits(4) and not steps.fits(5)  # 10 + bucket 8 > 16, though 10 + 5 fits
    assert not steps.fits(0) and not steps.fits(9)
    with pytest.raises(ValueError, match="does not fit"):
        steps.forward(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="1-D"):
        steps.forward(torch.zeros(1, 2, dtype=torch.int64))
    assert cache.length == 10 and steps.replays == 0


def test_stage_runs_small_blocks_captured_and_the_rest_eagerly():
    """A prefill too large for a bucket runs eagerly, the decode steps captured; the tokens
    are those of the stage without captured steps."""
    prompt = list(range(3, 80))  # 77 tokens: more than the largest bucket
    plain = LlamaStage(model(seed=3), max_len=256)
    want = FastPipeline([plain]).generate(prompt, 12, ignore_eos=True).token_ids
    stage = LlamaStage(model(seed=3), max_len=256)
    stage.use_captured_steps()
    assert stage.steps.capture is False  # CPU: eager
    got = FastPipeline([stage]).generate(prompt, 12, ignore_eos=True).token_ids
    assert got == want and stage.steps.replays >= 11


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
def test_speculative_generation_with_captured_steps_equals_autoregressive(mode):
    draft_m, target_m = family(2, noise=0.2, seed=5, vocab=VOCAB, dim=64)
    for m in (draft_m, target_m):
        m.use_fused = False
    draft = LlamaStage(draft_m, name="draft", max_len=512)
    target = LlamaStage(target_m, name="target", max_len=512)
    prompt = [5, 7, 1, 9, 3, 2]
    ar = FastPipeline([target]).generate(prompt, 40, ignore_eos=True).token_ids
    for s in (draft, target):
        s.use_captured_steps()
    pipe = FastPipeline([draft, target], mode=mode, adaptive_windows=False, windows=[1, 5])
    res = pipe.generate(prompt, 40, ignore_eos=True)
    pipe.close()
    assert res.token_ids == ar
    assert res.stage_stats[-1].accepted > 0 and target.steps.replays > 0
    assert draft.steps.replays > 0


def _compile_inputs(m, size: int, max_len: int = 96):
    cache = m.new_cache(max_len)
    cache.k.zero_()
    cache.v.zero_()
    b = _Bucket(size, torch.device("cpu"))
    b.tokens.copy_(torch.randint(0, VOCAB, (size,), generator=torch.Generator().manual_seed(3)))
    return cache, b


def _check_compiled(m, backend: str, sizes: tuple[int, ...], lengths: tuple[int, ...], exact):
    """The step compiled whole (``fullgraph``: a graph break raises) once per bucket: another
    cache length or other tokens reuse the graph (``error_on_recompile``). Its logits and cache
    writes match the eager step's (``exact``: bit for bit)."""
    for size in sizes:
        torch._dynamo.reset()  # one graph per bucket: the next bucket's is no recompile
        cache, b = _compile_inputs(m, size)
        ref_cache, _ = _compile_inputs(m, size)
        compiled = torch.compile(
            lambda t, d, bits, length, valid, c=cache: static_step(m, t, d, bits, length, valid,
                                                                    c.k, c.v),
            fullgraph=True, backend=backend)
        length = torch.zeros((), dtype=torch.int32)
        valid = torch.zeros((), dtype=torch.int32)
        for i, start in enumerate(lengths):
            length.fill_(start)
            real = max(1, size - i % 2)
            valid.fill_(real)  # the real rows: a tensor, so no recompile either
            b.tokens[0] = i  # other tokens, same graph
            with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
                got = compiled(b.tokens, b.depths, b.bits, length, valid)
                want = static_step(m, b.tokens, b.depths, b.bits, length, valid, ref_cache.k,
                                   ref_cache.v)
            if exact:
                assert torch.equal(got, want)
                assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
            else:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(cache.k, ref_cache.k, atol=1e-5, rtol=1e-5)
            written = cache.k[:, :, start : start + real]
            assert bool(written.abs().amax(-1).gt(0).all())  # the block's slots were written


def test_step_traces_whole_without_recompiles_aot_eager():
    """Graph breaks and re-specialisation on the cache length are caught here: dynamo traces
    the whole step (``fullgraph``) and AOT autograd functionalises the custom ops' cache
    writes; the ops run the same kernels, so the results are the eager step's bit for bit."""
    _check_compiled(model(), "aot_eager", (1, 8), (0, 5, 40), exact=True)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile (inductor) on CPU needs a C compiler")
def test_step_compiles_with_inductor():
    """Inductor lowers the traced step (the custom ops stay opaque calls with declared
    mutations); its fused elementwise code rounds differently, so close, not equal. One layer
    and one bucket: about 35 s of compilation on 2 busy cores."""
    m = family(1, seed=6, vocab=VOCAB, dim=64, n_heads=4, n_kv_heads=2, n_layers=1)[0]
    _check_compiled(m, "inductor", (4,), (3, 17), exact=False)


def test_tensor_cache_len_in_the_ops_entry_and_the_static_custom_op():
    """``cache_len`` as a 0-d tensor gives the int's results (reference path), a tensor of the
    wrong kind is refused naming it, and the static op computes the real rows alone."""
    from pipespec_fast import ops

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, generator=gen)
    kn, vn = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    kc, vc = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    bits = reference.ancestor_bits(torch.tensor([-1, 0, 0]))
    want = ops.verify_attention(q, kn, vn, kc.clone(), vc.clone(), 5, bits)
    k2, v2 = kc.clone(), vc.clone()
    assert torch.equal(ops.verify_attention(q, kn, vn, k2, v2, torch.tensor(5, dtype=torch.int32),
                                            bits), want)
    assert torch.equal(k2[:, 5:8], kn.transpose(0, 1))
    # the static op: rows from n_valid = 2 on are padding (zero, no slot written)
    k2, v2 = kc.clone(), vc.clone()
    got = torch.ops.pipespec.verify_attention_static(
        q, kn, vn, k2, v2, torch.tensor(5, dtype=torch.int32), bits,
        torch.tensor(2, dtype=torch.int32))
    want2 = ops.verify_attention(q[:2], kn[:2], vn[:2], kc.clone(), vc.clone(), 5, bits[:2])
    assert torch.equal(got[:2], want2) and not got[2:].any()
    assert torch.equal(k2[:, 5:7], kn[:2].transpose(0, 1)) and torch.equal(k2[:, 7], kc[:, 7])
    for bad in (torch.tensor([5], dtype=torch.int32), torch.tensor(5.0), torch.tensor(5)):
        with pytest.raises(ValueError, match="^cache_len: a tensor must be 0-d int32"):
            ops.verify_attention(q, kn, vn, kc, vc, bad, bits)
    i32 = torch.int32
    torch.library.opcheck(torch.ops.pipespec.verify_attention_static,
                          (q, kn, vn, kc.clone(), vc.clone(), torch.tensor(5, dtype=i32), bits,
                           torch.tensor(3, dtype=i32)))


def test_linear_custom_op_is_the_models_matmul():
    from pipespec_fast.cpu.linear import linear

    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 24, generator=gen), torch.randn(40, 24, generator=gen)
    assert torch.equal(torch.ops.pipespec.linear(x, w), linear(x, w))
    torch.library.opcheck(torch.ops.pipespec.linear, (x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_equals_the_eager_step():
    """Captured and replayed, each bucket gives its eager static step's logits bit for bit
    (the same kernels), whatever the cache length and tokens of the replay."""
    m = model().cuda()
    eager = StaticSteps(m, m.new_cache(256), capture=False)
    steps = StaticSteps(m, m.new_cache(256))
    for c in (eager.cache, steps.cache):
        c.k.zero_()
        c.v.zero_()
    steps.warm_up()
    assert all(b.graph is not None for b in steps._buckets.values())
    # cached slots hold values first: a bucket captured later (lazily, after them) must
    # leave them alone
    prefix = torch.randint(0, VOCAB, (30,), device="cuda")
    m(prefix, eager.cache)
    m(prefix, steps.cache)
    steps._buckets.pop(64)
    steps.cache.length = 30
    before = steps.cache.k[:, :, :30].clone()
    steps._bucket(64)
    assert torch.equal(steps.cache.k[:, :, :30], before)
    for n, start in ((1, 30), (5, 31), (9, 36), (64, 45)):  # each after the last
        toks = torch.randint(0, VOCAB, (n,), device="cuda")
        for s in (eager, steps):
            s.cache.length = start
        want = eager.forward(toks).clone()
        got = steps.forward(toks)
        assert torch.equal(got, want)
