"""Batch-invariant mode (``PIPESPEC_BATCH_INVARIANT=1``, ``LlamaStage(batch_invariant=True)``):
every forward of a model stage runs in blocks of exactly 64 rows (longer ones chunked), so a token's
logits are the same bits computed alone, as any row of a chain block of any length, or as a tree
node; greedy speculative decoding then equals AR token for token.

Both CPU paths are checked: the fused C stack (the CPU default, batch invariant by itself) and the
torch layers with the aligned reference attention (``use_fused=False``: the code CUDA runs, with the
CPU's GEMM and attention). The torch layers without batch-invariant mode are not batch invariant
(SDPA's softmax over a block), which :func:`test_torch_layers_differ_without_exact_mode` shows,
so these tests can fail."""

from __future__ import annotations

import pytest
import torch
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.decoding.captured import MAX_N
from pipespec_fast.stages.ngram import NGramStage

VOCAB = 96
PATHS = ["fused", "torch"]


def model(path: str, seed: int = 0):
    m = family(1, seed=seed, vocab=VOCAB, dim=64, n_heads=4, n_kv_heads=2)[0]
    m.use_fused = path == "fused"
    return m


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def decoded_alone(stage: LlamaStage, toks: torch.Tensor) -> list[torch.Tensor]:
    """Each token's logits, fed one at a time from an empty cache."""
    stage.rollback(0)
    return [stage.forward(t.view(1))[0].clone() for t in toks]


def feed(stage: LlamaStage, toks: torch.Tensor, start: int) -> None:
    """The cache at ``start`` tokens of ``toks`` (fed one at a time: exact whatever came
    before)."""
    stage.rollback(0)
    for t in toks[:start]:
        stage.forward(t.view(1))


@pytest.mark.parametrize("path", PATHS)
def test_a_tokens_logits_are_the_same_alone_in_any_chain_block_and_chunked(path):
    stage = LlamaStage(model(path), max_len=256, batch_invariant=True)
    toks = tokens(200)
    alone = decoded_alone(stage, toks)
    for start, n in [(0, 1), (3, 2), (10, 33), (0, 64), (70, 64), (5, 65), (3, 150), (40, 128)]:
        feed(stage, toks, start)
        out = stage.forward(toks[start : start + n])
        assert out.shape == (n, VOCAB) and stage.cache_len == start + n
        for i in range(n):
            assert torch.equal(out[i], alone[start + i]), (start, n, i)
    assert stage.steps.batch_invariant and stage.steps.sizes == (MAX_N,)


@pytest.mark.parametrize("path", PATHS)
def test_a_tree_nodes_logits_are_its_path_decoded_alone(path):
    """Node ``i`` of a tree whose depth-``d`` nodes all carry token ``toks[start + d]`` has the
    path ``toks[start : start + d + 1]``: its logits are that position's, decoded alone."""
    stage = LlamaStage(model(path), max_len=256, batch_invariant=True)
    toks = tokens(80, seed=4)
    alone = decoded_alone(stage, toks)
    parents = torch.tensor([-1, 0, 0, 1, 2, 3, 3, 6, 4, -1, 9, 7, 11, 12])
    depth = [0] * len(parents)
    for i, p in enumerate(parents.tolist()):
        depth[i] = 0 if p < 0 else depth[p] + 1
    start = 50
    feed(stage, toks, start)
    out = stage.forward(toks[[start + d for d in depth]], parents=parents)
    for i, d in enumerate(depth):
        assert torch.equal(out[i], alone[start + d]), (i, d)
    # the accepted path compacted (keep_path), then decoding on: still the sequence's logits
    path = torch.tensor([0, 1, 3, 5, 7, 11])
    stage.keep_path(start, path, len(path))
    assert stage.cache_len == start + len(path)
    nxt = stage.forward(toks[start + len(path)].view(1))
    assert torch.equal(nxt[0], alone[start + len(path)])


@pytest.mark.parametrize("path", PATHS)
def test_chunked_prefill_leaves_the_cache_of_token_by_token_decoding(path):
    """A 150-token prefill in three chunks (last_n=1, as the sequencer asks): the valid cache
    slots are those of feeding the tokens one at a time, and the fused path's are also the
    eager unchunked forward's."""
    toks = tokens(150, seed=2)
    stage = LlamaStage(model(path), max_len=256, batch_invariant=True)
    feed(stage, toks, 150)
    want_k, want_v = stage.cache.k[:, :, :150].clone(), stage.cache.v[:, :, :150].clone()
    stage.rollback(0)
    last = stage.forward(toks, last_n=1)
    assert last.shape == (1, VOCAB) and stage.cache_len == 150
    assert torch.equal(stage.cache.k[:, :, :150], want_k)
    assert torch.equal(stage.cache.v[:, :, :150], want_v)
    if path == "fused":
        m = model(path)
        eager = m.new_cache(256)
        want = m(toks, eager, last_n=1)
        assert torch.equal(last, want)
        assert torch.equal(eager.k[:, :, :150], want_k)


def test_last_n_across_chunks_and_a_failure_restores_the_cache():
    stage = LlamaStage(model("fused"), max_len=256, batch_invariant=True)
    toks = tokens(150, seed=5)
    full = stage.forward(toks)
    for last_n in (0, 1, 20, 86, 87, 150):
        stage.rollback(0)
        got = stage.forward(toks, last_n=last_n)
        assert torch.equal(got, full[150 - last_n :]), last_n
    stage.rollback(0)
    calls = {"n": 0}
    run = stage.steps._run

    def fail_on_second(b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return run(b)

    stage.steps._run = fail_on_second
    with pytest.raises(RuntimeError, match="boom"):
        stage.forward(toks)
    assert stage.cache_len == 0


def test_the_last_slots_of_the_context_run_in_exact_blocks_too():
    """The cache holds 63 spare slots for the padding rows, so a stage fills its whole
    ``max_len`` in exact blocks (never the eager path), and its reported context is unchanged."""
    stage = LlamaStage(model("fused"), max_len=100, batch_invariant=True)
    assert stage.max_len == 100 and stage.cache.max_len == 100 + MAX_N - 1
    toks = tokens(100, seed=6)
    stage.forward(toks[:90])
    replays = stage.steps.replays
    for t in toks[90:]:
        stage.forward(t.view(1))
    assert stage.cache_len == 100 and stage.steps.replays == replays + 10


def test_no_real_token_goes_past_max_len():
    """The spare slots take padding rows only: a block that would carry a real token past
    ``max_len`` is refused, as the eager path refuses a cache overflow, and nothing moves."""
    stage = LlamaStage(model("fused"), max_len=100, batch_invariant=True)
    toks = tokens(100, seed=6)
    stage.forward(toks[:99])
    with pytest.raises(ValueError, match="does not fit"):
        stage.forward(toks[99:].repeat(2))
    assert stage.cache_len == 99
    stage.forward(toks[99:])
    assert stage.cache_len == 100


def test_the_setting_turns_it_on_for_every_model_stage(configure):
    configure(batch_invariant=True)
    stage = LlamaStage(model("fused"), max_len=64)
    assert stage.batch_invariant and stage.steps.batch_invariant
    assert stage.capabilities.trees  # CPU: trees are exact
    configure(batch_invariant=False)
    assert LlamaStage(model("fused"), max_len=64).steps is None


def test_exact_mode_refuses_trees_on_cuda_only(monkeypatch):
    """On CUDA a tree's attention is not batch invariant (masked siblings between a node's
    ancestors), so an exact CUDA stage offers no trees; a CPU one does (checked above)."""
    stage = LlamaStage(model("fused"), max_len=64, batch_invariant=True)
    assert stage.capabilities.trees
    monkeypatch.setattr(LlamaStage, "device", property(lambda self: torch.device("cuda")))
    assert not stage.capabilities.trees
    assert LlamaStage(model("fused"), max_len=64).capabilities.trees  # not exact: trees


def test_torch_layers_differ_without_exact_mode():
    """Why the mode exists: the torch layers' block forward differs from decoding alone in
    some row (their attention rounds a block's softmax differently)."""
    stage = LlamaStage(model("torch"), max_len=256)
    toks = tokens(130)
    alone = decoded_alone(stage, toks)
    feed(stage, toks, 2)
    out = stage.forward(toks[2:130])
    assert any(not torch.equal(out[i], alone[2 + i]) for i in range(128))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["sync", "pipespec"])
@pytest.mark.parametrize("k", [2, 3])
def test_greedy_speculative_decoding_equals_autoregressive(path, mode, k):
    models = family(k, noise=0.05, seed=9, vocab=VOCAB, dim=64)
    for m in models:
        m.use_fused = path == "fused"
    stages = [LlamaStage(m, name=f"m{i}", max_len=512, batch_invariant=True)
              for i, m in enumerate(models)]
    ar = FastPipeline(stages[-1:])
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False, regimes=False,
                        windows=[1, 5] if k == 2 else [1, 3, 5])
    for prompt in ([5, 7, 1, 9, 3, 2], list(range(3, 90))):  # the second prefill is chunked
        want = ar.generate(prompt, 60, ignore_eos=True).token_ids
        res = pipe.generate(prompt, 60, ignore_eos=True)
        assert res.token_ids == want
        assert res.stage_stats[-1].accepted > 0
    pipe.close()


def test_trees_in_exact_mode_equal_autoregressive():
    """n-gram token trees verified by an exact target (the CPU: trees are batch invariant)."""
    target = LlamaStage(model("torch", seed=3), name="t", max_len=512, batch_invariant=True)
    pipe = FastPipeline([NGramStage(VOCAB), target], tree_budget=8)
    prompt = [2, 7, 2, 7, 2, 7, 2, 9, 4, 2, 7, 2]
    want = FastPipeline([target]).generate(prompt, 50, ignore_eos=True).token_ids
    assert pipe.generate(prompt, 50, ignore_eos=True).token_ids == want
    pipe.close()


@pytest.mark.parametrize("path", ["fused", "torch"])
def test_a_big_tree_after_a_long_catch_up_fits_one_block(path):
    """A middle stage catching up on 21 tokens then verifying a 48-node tree: the catch-up is
    fed first and the tree cut to the rows left in one 64-row block (it used to raise in
    batch-invariant mode); the committed tokens are a plain stage's."""
    from pipespec_fast.decoding.sampling import SamplingParams
    from pipespec_fast.decoding.sequence import Sequencer
    from pipespec_fast.decoding.tree_step import verify_tree
    from pipespec_fast.stages.tree import DraftTree

    parents = tuple([-1] + [(i - 1) // 2 for i in range(1, 48)])
    tree = DraftTree(tokens=tuple(int(t) for t in tokens(48, seed=9)), parents=parents,
                     weights=tuple(1.0 / (1 + i) for i in range(48)))
    got = []
    for invariant in (True, False):
        s = Sequencer(LlamaStage(model(path), max_len=256, batch_invariant=invariant),
                      SamplingParams(), index=1, adaptive=False)
        s.start(tokens(10, seed=3).tolist())
        s.span.extend_known(tokens(21, seed=4).tolist())  # adopted from above, not cached
        verify_tree(s, tree)
        assert s.stage.cache_len == len(s.seq) - 1
        got.append(s.seq)
    assert got[0] == got[1]
