"""A model drafter's token trees (``stages/model_tree.py``): its greedy chain with siblings where
it is unsure, verified in one forward by the stage above in sync mode; greedy output equal to
the target's own for k = 2, 3, 4, sampled output exactly the target's (chi-square), the
drafter's cache left as it was, PipeSpec refusing what it would not do."""

from __future__ import annotations

import pytest
import torch
from test_ngram import chi_square_p
from test_tree_decoding import PROMPTS, exact_joint
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage, StageError
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.errors import NonFiniteLogitsError
from pipespec_fast.stages.model_tree import chain_tree


def _scripted(rows: list[list[float]]):
    """A fake drafter: ``step`` returns the next scripted distribution (as logits) and records
    the tokens fed; ``root`` is the first."""
    logits = [torch.tensor(r).log() for r in rows]
    fed: list[int] = []

    def step(token: int) -> torch.Tensor:
        fed.append(token)
        return logits[len(fed)]

    return logits[0], step, fed


def test_chain_tree_widens_only_where_the_drafter_is_unsure():
    # depth 0 unsure (0.5): siblings 1 and 2; depth 1 sure (0.9): none; depth 2 unsure (0.6)
    root, step, fed = _scripted([[0.5, 0.3, 0.2, 0.0], [0.05, 0.0, 0.05, 0.9],
                                 [0.0, 0.6, 0.4, 0.0]])
    tree = chain_tree(step, root, budget=10, max_depth=3, decay=0.9)
    assert fed == [0, 3]  # one drafter forward per level after the root, along the chain
    # priority w * 0.9 ** (depth + 1): chain 0 (.9), chain 3 (.81), chain 1 (.729),
    # sibling 1 of the root (.6 * .9 = .54), sibling 2 under chain 3 (.667 * .729 = .486),
    # sibling 2 of the root (.4 * .9 = .36)
    assert tree.tokens == (0, 3, 1, 1, 2, 2)
    assert tree.parents == (-1, 0, 1, -1, 1, -1)
    assert tree.weights == pytest.approx((1, 1, 1, 0.6, 0.4 / 0.6, 0.4))


def test_chain_tree_budget_keeps_the_best_nodes_and_whole_paths():
    root, step, _ = _scripted([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.4, 0.35, 0.25]])
    full = chain_tree(step, root, budget=48, max_depth=3, decay=0.5)
    root, step, _ = _scripted([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.4, 0.35, 0.25]])
    cut = chain_tree(step, root, budget=4, max_depth=3, decay=0.5)
    assert len(full) == 9 and cut == full.prefix(4)
    assert all(p < i for i, p in enumerate(cut.parents))
    assert chain_tree(step, root, budget=0, max_depth=3).tokens == ()


def test_propose_tree_is_the_greedy_chain_and_leaves_the_cache_as_it_was():
    draft = LlamaStage(family(1, seed=3)[0], max_len=128)
    history = torch.tensor(PROMPTS[1])
    draft.forward(history, last_n=1)
    k_before, v_before = draft.cache.k.clone(), draft.cache.v.clone()
    tree = draft.propose_tree(16, 5)
    n = len(history)
    assert draft.cache_len == n
    assert torch.equal(draft.cache.k[:, :, :n], k_before[:, :, :n])
    assert torch.equal(draft.cache.v[:, :, :n], v_before[:, :, :n])
    chain = [t for t, w in zip(tree.tokens, tree.weights, strict=True) if w == 1.0]
    ref = FastPipeline([LlamaStage(draft.model, max_len=128)], mode="ar").generate(
        PROMPTS[1], 5, ignore_eos=True).token_ids
    assert chain == ref
    with pytest.raises(RuntimeError, match="propose_tree needs the logits"):
        draft.propose_tree(16, 5)  # its rollback invalidated the root


def test_tree_drafting_is_recorded_as_the_drafters_forwards():
    draft_m, target_m = family(2, noise=0.05, seed=8)
    stages = [LlamaStage(draft_m, name="draft", max_len=256),
              LlamaStage(target_m, name="target", max_len=256)]
    res = pipe_of(stages, 8, windows=[0, 4]).generate(PROMPTS[1], 40, ignore_eos=True)
    drafter, target = res.stage_stats
    kinds = [kind for _, _, kind in drafter.timeline]
    assert target.tree_steps > 0 and kinds.count("draft") >= 2 * target.tree_steps
    assert drafter.forwards == len(drafter.timeline)


def pipe_of(stages, budget, **kw):
    return FastPipeline(stages, mode="sync", adaptive_windows=False, tree_budget=budget, **kw)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_sync_model_trees_greedy_equal_autoregressive(k, monkeypatch):
    """The lowest model stage proposes trees to the one above; every stage higher up verifies
    chains; the output is the target's own. Siblings really were accepted: the verifier kept
    paths off the chain (compacted its cache)."""
    models = family(k, noise=0.05, seed=20 + k)
    stages = [LlamaStage(m, name=f"m{i}", max_len=512) for i, m in enumerate(models)]
    verifier, off_chain = stages[1], []
    keep_path = verifier.keep_path

    def spy(start, path, num, chain=False):
        off_chain.append(not chain)
        keep_path(start, path, num, chain)

    monkeypatch.setattr(verifier, "keep_path", spy)
    trees = 0
    for prompt in PROMPTS:
        ref = FastPipeline([stages[-1]]).generate(prompt, 100, ignore_eos=True).token_ids
        res = pipe_of(stages, 10).generate(prompt, 100, ignore_eos=True)
        assert res.token_ids == ref
        trees += res.stage_stats[1].tree_steps
    assert trees > 0 and any(off_chain)


def test_model_tree_sampling_matches_target_distribution():
    """Siblings beside the drafter's first token: the first two sampled tokens follow the
    target's joint distribution, and a sibling was what the target accepted in many runs."""
    V, n = 6, 1500
    params = SamplingParams(0.9, top_k=5)
    draft_m, target_m = family(2, seed=7, vocab=V, noise=0.3)
    draft, target = LlamaStage(draft_m, max_len=64), LlamaStage(target_m, max_len=64)
    prompt = PROMPTS[0]
    joint = exact_joint(target, prompt, params)
    draft.forward(torch.tensor(prompt), last_n=1)
    tree = draft.propose_tree(8, 2)
    siblings = {t for t, p in zip(tree.tokens, tree.parents, strict=True) if p < 0}
    assert len(siblings) > 1  # the drafter is unsure of its first token: the root is widened
    chain_first = tree.tokens[0]
    pipe = pipe_of([draft, target], 8)
    counts = torch.zeros(V * V, dtype=torch.float64)
    sibling_accepted = 0
    for seed in range(n):
        res = pipe.generate(prompt, 2, temperature=params.temperature, top_k=params.top_k,
                            seed=seed, ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        sibling_accepted += (res.stage_stats[-1].accepted >= 1 and a != chain_first
                             and a in siblings)
    assert sibling_accepted > 50
    exp = joint.flatten() * n
    impossible = exp == 0
    assert counts[impossible].sum() == 0
    assert chi_square_p(counts[~impossible], exp[~impossible]) > 1e-3


def test_pipespec_refuses_trees_from_a_model_drafter():
    draft_m, target_m = family(2, seed=1)
    stages = [LlamaStage(draft_m, max_len=64), LlamaStage(target_m, max_len=64)]
    with pytest.raises(ValueError, match="mode: tree_budget=4 with a model drafter"):
        FastPipeline(stages, tree_budget=4)
    pipe = pipe_of(stages, 4)
    with pytest.raises(ValueError, match="needs mode='sync'"):
        pipe.generate(PROMPTS[1], 4, mode="pipespec")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_drafter_rows_in_a_tree_raise_naming_the_drafter(bad, monkeypatch):
    draft_m, target_m = family(2, seed=2)
    draft = LlamaStage(draft_m, name="draft", max_len=128)
    target = LlamaStage(target_m, name="target", max_len=128)
    forward = draft.forward

    def poisoned(tokens, parents=None, last_n=None):
        out = forward(tokens, parents, last_n).clone()
        out[:, 3] = bad
        return out

    monkeypatch.setattr(draft, "forward", poisoned)  # the chain's steps, after the root
    with pytest.raises(StageError, match=r"stage 0 \(draft\).*non-finite") as info:
        pipe_of([draft, target], 8).generate(PROMPTS[1], 20, ignore_eos=True)
    assert isinstance(info.value.__cause__, NonFiniteLogitsError)
    assert "no tree can be grown" in str(info.value.__cause__)  # raised growing the tree
