"""The n-gram drafter's token tree: continuations of the matched suffix (against a brute-force
scan), their trie (merging, counts, budget, order) and the DraftTree the kernels take."""

from __future__ import annotations

import random

import pytest
import torch

from pipespec_fast import reference
from pipespec_fast.stages.ngram import NGramStage
from pipespec_fast.stages.ngram_index import SuffixIndex
from pipespec_fast.stages.ngram_tree import continuation_trie, matched_continuations, ngram_tree
from pipespec_fast.stages.tree import DraftTree


def brute_continuations(h, max_n, min_n, depth, occ):
    """What followed the most recent earlier occurrences of the longest matched suffix."""
    last = len(h) - 1
    for n in range(min(max_n, last + 1), min_n - 1, -1):
        suf = h[last - n + 1 :]
        ends = [e for e in range(n - 1, last) if h[e - n + 1 : e + 1] == suf]
        if ends:
            return [h[e + 1 : e + 1 + depth] for e in reversed(ends)][:occ], n
    return [], 0


def index_of(h, max_n=4, min_n=1):
    ix = SuffixIndex(min_n, max_n)
    for t in h:
        ix.append(t)
    return ix


def test_trie_merges_counts_and_orders_most_likely_first():
    tree = continuation_trie([[1, 2, 3], [1, 2, 4], [1, 5], [6]], budget=10)
    assert tree.tokens == (1, 2, 3, 4, 5, 6)
    assert tree.parents == (-1, 0, 1, 1, 0, -1)
    assert tree.weights == (1.0, 1.0, 1.0, 0.25, 0.25, 0.25)  # the most recent one: 1
    assert tree.depths() == [0, 1, 2, 2, 1, 0]
    # the budget keeps the most likely nodes, ties to the most recent continuation
    assert continuation_trie([[1, 2, 3], [1, 2, 4], [1, 5], [6]], budget=3).tokens == (1, 2, 3)
    cut = continuation_trie([[7, 8], [1, 2], [1, 3], [1, 4]], budget=3)
    assert (cut.tokens, cut.parents, cut.weights) == ((7, 8, 1), (-1, 0, -1), (1.0, 1.0, 0.75))
    assert continuation_trie([], 5) == continuation_trie([[1]], 0) == DraftTree((), (), ())
    # one continuation: the chain drafter's proposal
    chain = continuation_trie([[4, 4, 9, 1]], budget=8)
    assert chain.is_chain and chain.tokens == (4, 4, 9, 1)


@pytest.mark.parametrize("seed", range(20))
def test_trie_budget_keeps_the_top_nodes_closed_under_parents(seed):
    rng = random.Random(seed)
    conts = [[rng.randrange(3) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 9))]
    full = continuation_trie(conts, budget=10**6)
    budget = rng.randint(1, len(full))
    tree = continuation_trie(conts, budget)
    paths = _paths(full)
    assert sorted(paths.values()) == sorted({tuple(c[:i]) for c in conts
                                             for i in range(1, len(c) + 1)})
    for i, path in paths.items():  # a node's weight: continuations through it, over all ...
        share = sum(tuple(c[: len(path)]) == path for c in conts) / len(conts)
        recent = tuple(conts[0][: len(path)]) == path  # ... but 1 on the most recent one
        assert full.weights[i] == (1.0 if recent else share)
    assert len(tree) == budget
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))  # topological
    kept = _paths(tree)
    assert set(kept.values()) <= set(paths.values())
    assert len(set(kept.values())) == budget  # siblings distinct
    # nothing left out is more likely than something kept
    left = [full.weights[i] for i, p in paths.items() if p not in set(kept.values())]
    assert not left or max(left) <= min(tree.weights)
    for p in set(tree.parents):  # siblings most likely first
        sibs = [tree.weights[j] for j in range(len(tree)) if tree.parents[j] == p]
        assert sibs == sorted(sibs, reverse=True)
    # the kernels' helpers read the same tree
    parents = tree.parents_tensor()
    assert reference.tree_depths(parents).tolist() == tree.depths()


def _paths(tree: DraftTree) -> dict[int, tuple[int, ...]]:
    out: dict[int, tuple[int, ...]] = {}
    for i, (t, p) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        out[i] = (out[p] if p >= 0 else ()) + (t,)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_continuations_match_a_brute_force_scan(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5])
    h = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    depth, occ = rng.randint(1, 6), rng.randint(1, 5)
    got = matched_continuations(index_of(h), depth, occ)
    assert got == brute_continuations(h, 4, 1, depth, occ), h


def test_siblings_at_depth_two_from_a_repeated_prefix():
    h = [1, 5, 2, 3, 1, 5, 2, 4, 1, 5]
    tree, match = ngram_tree(index_of(h), budget=8, max_depth=3)
    assert match == 2
    assert (tree.tokens, tree.parents) == ((2, 4, 1, 3, 1), (-1, 0, 1, 0, 3))
    assert tree.weights == (1.0, 1.0, 1.0, 0.5, 0.5)
    # min_match: the only match is 2 tokens long
    assert ngram_tree(index_of(h), 8, 3, min_match=3) == (DraftTree((), (), ()), 0)


def test_stage_proposes_trees_after_its_history():
    st = NGramStage(16, min_confident_match=1)
    assert st.capabilities.tree_drafts and not st.capabilities.trees
    st.forward(torch.tensor([1, 5, 2, 3, 1, 5, 2, 4, 1, 5]), last_n=0)
    tree = st.propose_tree(budget=3, max_depth=3)
    assert (tree.tokens, tree.parents) == ((2, 4, 1), (-1, 0, 1))
    assert st.last_match_len == 2
    st.rollback(9)  # history ends with 1: (1) occurred at 0, 4
    tree = st.propose_tree(budget=8, max_depth=2)
    assert (tree.tokens, tree.parents) == ((5, 2), (-1, 0))
    st.rollback(1)
    assert len(st.propose_tree(8, 4)) == 0 and st.last_match_len == 0


def test_draft_tree_checks_and_rows():
    with pytest.raises(ValueError, match="topological"):
        DraftTree((1, 2), (-1, 1), (1.0, 1.0))
    with pytest.raises(ValueError, match="2 tokens, 1 parents"):
        DraftTree((1, 2), (-1,), (1.0, 1.0))
    t = DraftTree((3, 0, 3), (-1, -1, 1), (0.5, 0.5, 0.5))
    rows = t.one_hot_rows(5)
    assert rows.tolist() == [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert t.parents_tensor(offset=2).tolist() == [1, 1, 3]
    assert t.path_tokens([1, 2]) == [0, 3] and not t.is_chain


def test_decay_orders_nodes_by_estimated_acceptance():
    conts = [[1, 2, 3], [4], [4]]
    assert continuation_trie(conts, 2).tokens == (1, 2)  # weights alone: the recent one deeper
    assert continuation_trie(conts, 2, decay=0.5).tokens == (1, 4)  # 2/3 > 1 * 0.5
    tree = continuation_trie(conts, 4, decay=0.5)
    assert tree.prefix(2) == DraftTree((1, 4), (-1, -1), (1.0, 2 / 3))
    assert tree.prefix(9) is tree


def _policy(latency):
    from pipespec_fast.decoding.window import WindowPolicy

    pol = WindowPolicy(timed=True)
    pol.set_state(8.0, 2.0, latency)
    return pol


@pytest.mark.parametrize("c1", [0.0, 0.0005, 0.002, 0.05])
def test_tree_cut_maximises_expected_tokens_per_second(c1):
    from pipespec_fast.decoding.tree_step import worth_verifying

    tree = DraftTree((1, 2, 3, 4, 5), (-1, 0, 0, 1, -1), (1.0, 0.6, 0.4, 0.6, 0.1))
    pol = _policy({1: (0.01 + c1, 5.0), 9: (0.01 + 9 * c1, 5.0)})
    a = pol.acceptance
    depths = tree.depths()

    def rate(m):
        return (1 + sum(tree.weights[i] * a ** (depths[i] + 1) for i in range(m))) / \
            (0.01 + c1 * (1 + m))

    m = worth_verifying(pol, tree, 1)
    assert rate(m) == pytest.approx(max(rate(j) for j in range(1, 6)))
    if c1 == 0.0:
        assert m == 5  # flat verify cost (an accelerator): every node
    if c1 == 0.05:  # a node costs 5x a step's fixed part: the first only (the window's call,
        assert m == 1  # maybe an exploration)
    # no line yet, or fixed windows: every node
    assert worth_verifying(_policy({1: (0.01, 5.0)}), tree, 1) == 5
    fixed = _policy({1: (0.01, 5.0), 9: (0.5, 5.0)})
    fixed.adaptive = False
    assert worth_verifying(fixed, tree, 1) == 5
