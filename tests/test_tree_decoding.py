"""Tree drafts end to end: the n-gram drafter's token trees verified in one forward (tree
attention), the accepted path's KV compacted, greedy output equal to the target's own, sampled
output exactly the target's distribution (chi-square over siblings at depth 2)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from test_ngram import _target_ignores_model_drafts, chi_square_p
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.tree_step import verify_tree
from pipespec_fast.reference import probs_from_logits
from pipespec_fast.stages.ngram import NGramStage
from pipespec_fast.stages.tree import DraftTree

# (1, 5) occurred three times, followed by 2 4 1 .., 2 3 1 .. and 0 1 5 ..: the tree after the
# prompt has siblings at depth 1 (2 | 0) and at depth 2 (4 | 3 under 2)
BRANCHY = [1, 5, 0, 1, 5, 2, 3, 1, 5, 2, 4, 1, 5]
PROMPTS = (BRANCHY, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6], [2])


def pipe_of(stages, mode, tree_budget, **kw):
    # fixed windows: every step verifies a tree as deep as the window, so trees really are
    # checked (the adaptive window may switch speculation off for tiny models)
    return FastPipeline(stages, mode=mode, adaptive_windows=False, tree_budget=tree_budget, **kw)


def test_ngram_tree_proposal_for_the_test_prompt():
    st = NGramStage(16)
    st.forward(torch.tensor(BRANCHY), last_n=0)
    tree = st.propose_tree(8, 3)
    assert (tree.tokens, tree.parents) == ((2, 4, 1, 3, 1, 0, 1, 5), (-1, 0, 1, 0, 3, -1, 5, 6))


@pytest.mark.parametrize("budget", [3, 12])
def test_sync_tree_greedy_equals_autoregressive_k2(budget):
    target = LlamaStage(family(1, seed=2)[0], max_len=512)
    ngram = NGramStage(target.vocab_size)
    trees = accepted = 0
    for prompt in PROMPTS:
        ref = FastPipeline([target]).generate(prompt, 120, ignore_eos=True).token_ids
        res = pipe_of([ngram, target], "sync", budget).generate(prompt, 120, ignore_eos=True)
        assert res.token_ids == ref
        st = res.stage_stats[-1]
        trees += st.tree_steps
        accepted += st.accepted
        # a tree's verify is its own kind of forward on the time line (bench/plots.py)
        assert sum(1 for _, _, kind in st.timeline if kind == "tree") == st.tree_steps
    assert trees > 0 and accepted > 0


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
def test_tree_greedy_equals_autoregressive_k3(mode):
    draft_m, target_m = family(2, noise=0.05, seed=4)
    draft = LlamaStage(draft_m, name="draft", max_len=512)
    target = LlamaStage(target_m, name="target", max_len=512)
    ngram = NGramStage(target.vocab_size)
    trees = 0
    for prompt in PROMPTS:
        ref = FastPipeline([target]).generate(prompt, 120, ignore_eos=True).token_ids
        res = pipe_of([ngram, draft, target], mode, 10).generate(prompt, 120, ignore_eos=True)
        assert res.token_ids == ref
        trees += sum(s.tree_steps for s in res.stage_stats)
    assert trees > 0 and res.stage_stats[-1].accepted > 0


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
def test_tree_greedy_equals_autoregressive_k4(mode):
    """[n-gram -> draft 1 -> draft 2 -> target]: the first draft verifies the n-gram trees,
    the stages above verify chains; every output is the target's own."""
    d1, d2, target_m = family(3, noise=0.05, seed=11)
    stages = [LlamaStage(m, name=f"m{i}", max_len=512) for i, m in enumerate((d1, d2, target_m))]
    target = stages[-1]
    trees = 0
    for prompt in PROMPTS:
        ref = FastPipeline([target]).generate(prompt, 100, ignore_eos=True).token_ids
        res = pipe_of([NGramStage(target.vocab_size)] + stages, mode, 10).generate(
            prompt, 100, ignore_eos=True)
        assert res.token_ids == ref
        trees += res.stage_stats[1].tree_steps
    assert trees > 0


def test_pipespec_tree_greedy_equals_autoregressive_k2():
    target = LlamaStage(family(1, seed=2)[0], max_len=512)
    trees = 0
    for prompt in PROMPTS:
        ref = FastPipeline([target]).generate(prompt, 120, ignore_eos=True).token_ids
        res = pipe_of([NGramStage(target.vocab_size), target], "pipespec", 10).generate(
            prompt, 120, ignore_eos=True)
        assert res.token_ids == ref
        trees += res.stage_stats[-1].tree_steps
    assert trees > 0


def test_target_verifies_skip_level_trees(monkeypatch):
    """[n-gram -> draft -> target] in PipeSpec, the target not taking the draft's tokens: what
    it verifies are the trees of its skip-level n-gram copy; greedy output stays the target's."""
    draft_m, target_m = family(2, noise=0.05, seed=4)
    draft = LlamaStage(draft_m, name="draft", max_len=512)
    target = LlamaStage(target_m, name="target", max_len=512)
    _target_ignores_model_drafts(monkeypatch, 2)
    trees = 0
    for prompt in PROMPTS:
        ref = FastPipeline([target]).generate(prompt, 120, ignore_eos=True).token_ids
        res = pipe_of([NGramStage(target.vocab_size), draft, target], "pipespec", 10).generate(
            prompt, 120, ignore_eos=True)
        assert res.token_ids == ref
        trees += res.stage_stats[-1].tree_steps
    assert trees > 0 and res.stage_stats[-1].accepted > 0


@pytest.mark.parametrize("fused", [True, False])
def test_compacted_cache_equals_a_fresh_prefill_of_the_accepted_sequence(fused):
    """A tree whose accepted path skips nodes (a rejected first root child, a rejected sibling
    at depth 1): after the step the cache equals one prefill of prompt + accepted path."""
    model = family(1, seed=6)[0]
    model.use_fused = fused
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ar = FastPipeline([LlamaStage(model, max_len=64)]).generate(prompt, 4, ignore_eos=True)
    g1, g2, g3, g4 = ar.token_ids
    w = (g1 + 1) % 64  # not the target's token
    tree = DraftTree((w, g1, (g2 + 1) % 64, g2, g3, (g4 + 1) % 64), (-1, -1, 1, 1, 3, 4),
                     (0.5,) * 6)
    stage = LlamaStage(model, max_len=64)
    s = Sequencer(stage, SamplingParams(), 1)
    s.start(prompt)
    assert verify_tree(s, tree) == 3
    assert s.seq == prompt + [g1, g2, g3, g4]
    L = len(prompt) + 3
    assert stage.cache_len == L
    fresh = model.new_cache(64)
    model(torch.tensor(prompt + [g1, g2, g3]), fresh)
    same = torch.equal if fused else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5))
    assert same(stage.cache.k[:, :, :L], fresh.k[:, :, :L])
    assert same(stage.cache.v[:, :, :L], fresh.v[:, :, :L])
    assert s.stats.tree_steps == 1 and s.stats.rejected == 1  # stopped at g3, w rejected


def test_sampled_tree_step_keeps_each_token_with_the_row_it_came_from():
    """Under sampling each committed token keeps the verifier's distribution it was accepted
    or drawn from (the q the stage above checks it against): equal to the verifier's own
    distribution after the committed prefix, also when the accepted path skips nodes."""
    model = family(1, seed=6)[0]
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    g1, g2, g3 = FastPipeline([LlamaStage(model, max_len=64)]).generate(
        prompt, 3, ignore_eos=True).token_ids
    tree = DraftTree(((g1 + 1) % 64, g1, (g2 + 1) % 64, g2, g3), (-1, -1, 1, 1, 3), (0.5,) * 5)
    skipped = 0
    for seed in range(12):
        params = SamplingParams(0.5, seed=seed)
        s = Sequencer(LlamaStage(model, max_len=64), params, 1)
        s.start(prompt)
        num = verify_tree(s, tree)
        new = s.seq[len(prompt):]
        assert len(new) == num + 1
        skipped += num > 0 and new[0] == g1  # node 0 rejected, node 1 accepted
        for j in range(len(new)):
            fresh = model(torch.tensor(s.seq[: len(prompt) + j]), model.new_cache(64),
                          last_n=1)
            want = probs_from_logits(fresh, 0.5)[0]
            assert torch.allclose(s.span.rows[len(prompt) + j], want, atol=1e-6), (seed, j)
    assert skipped > 3


def exact_joint(target_stage, prompt, params):
    """The target's exact distribution over its first two sampled tokens."""
    model = target_stage.model
    V = model.config.vocab_size
    cache = model.new_cache(64)

    def probs(logits):
        return probs_from_logits(logits, params.temperature, params.top_k, params.top_p)

    p1 = probs(model(torch.tensor(prompt), cache, last_n=1)[0])
    joint = torch.zeros(V, V, dtype=torch.float64)
    base = cache.length
    for a in range(V):
        cache.rollback(base)
        joint[a] = p1[a].double() * probs(model(torch.tensor([a]), cache)[0]).double()
    return joint


def _slow_forward(monkeypatch, stage, seconds):
    """The stage's forward takes `seconds` longer: in a PipeSpec run whose target would
    otherwise often finish its two tokens before the middle stage has verified a tree (how
    often depends on the machine's load), the middle stage's verified trees reach it."""
    forward = stage.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(stage, "forward", slow)


SAMPLING = [SamplingParams(1.0), SamplingParams(0.8, top_k=4, top_p=0.95)]


@pytest.mark.parametrize("mode,params,k", [
    ("sync", SAMPLING[0], 2), ("sync", SAMPLING[1], 2), ("sync", SAMPLING[0], 3),
    ("sync", SAMPLING[1], 3), ("pipespec", SAMPLING[0], 2), ("pipespec", SAMPLING[1], 3),
    ("skip", SAMPLING[0], 3)])
def test_tree_sampling_matches_target_distribution(mode, params, k, monkeypatch):
    """Siblings at depth 1 and 2 (BRANCHY's tree) under recursive rejection sampling: the
    first two tokens follow the target's joint distribution; with k = 3 the middle stage
    verifies the tree and the target verifies its tokens against the rows they came from
    ("skip": PipeSpec whose target verifies only its skip-level copy's trees)."""
    V, n = 6, 1500
    skip = mode == "skip"
    if skip:
        _target_ignores_model_drafts(monkeypatch, 2)
        mode = "pipespec"
    models = family(k - 1, seed=7, vocab=V, noise=0.3)
    stages = [LlamaStage(m, name=f"m{i}", max_len=64) for i, m in enumerate(models)]
    joint = exact_joint(stages[-1], BRANCHY, params)
    if mode == "pipespec" and k == 3 and not skip:
        _slow_forward(monkeypatch, stages[-1], 0.003)
    pipe = pipe_of([NGramStage(V)] + stages, mode, 8)
    counts = torch.zeros(V * V, dtype=torch.float64)
    second_level = 0  # runs whose tree walk accepted a depth-1 node (into depth-2 siblings)
    for seed in range(n):
        res = pipe.generate(BRANCHY, 2, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, seed=seed, ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        second_level += res.stage_stats[-1 if skip else 1].accepted >= 1 and a == 2
    assert second_level > 50  # siblings at depth 2 were really tested
    exp = joint.flatten() * n
    impossible = exp == 0  # outside top-k / top-p: never emitted
    assert counts[impossible].sum() == 0
    assert chi_square_p(counts[~impossible], exp[~impossible]) > 1e-3


def test_seeded_sync_with_trees_is_reproducible():
    draft_m, target_m = family(2, noise=0.2, seed=5)
    stages = [NGramStage(64), LlamaStage(draft_m, max_len=256), LlamaStage(target_m, max_len=256)]
    pipe = FastPipeline(stages, mode="sync", tree_budget=8)
    runs = [pipe.generate(BRANCHY, 60, temperature=0.9, seed=s, ignore_eos=True).token_ids
            for s in (11, 11, 12)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("budget,match", [
    (-1, "tree_budget must be an integer in"), (49, "tree_budget must be"),
    (True, "tree_budget must be"), (4, "lowest stage must draft trees")])
def test_tree_budget_is_checked(budget, match):
    class ChainsOnly(LlamaStage):  # a model stage that declares no tree drafts
        capabilities = property(lambda self: dataclasses.replace(
            LlamaStage.capabilities.fget(self), tree_drafts=False))

    target = LlamaStage(family(1)[0], max_len=64)
    with pytest.raises(ValueError, match=match):
        FastPipeline([ChainsOnly(target.model, max_len=64), target], mode="sync",
                     tree_budget=budget)
