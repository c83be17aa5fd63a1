"""The n-gram drafter's token tree: every distinct continuation of the matched suffix, merged
into a trie weighted by how often it occurred, cut to a node budget.

A chain drafter bets on one earlier occurrence of the current suffix (the most recent). When
the suffix occurred several times with different continuations (code: ``for i in range(`` /
``for i in x:``; prose: a repeated phrase ending differently), one forward of the verifier can
check them all as a tree: its cost grows with the number of nodes, while the expected accepted
length grows with the probability mass the tree covers.

Construction, from a :class:`~pipespec_fast.stages.ngram_index.SuffixIndex`:

1. the longest suffix (``max_n`` down to ``min_match``) that also ended earlier;
2. its ``max_occurrences`` most recent earlier occurrences, each giving the up to ``max_depth``
   tokens that followed it (most recent first);
3. a trie of those continuations: each node counts the continuations through it. Its weight
   is its share of the continuations, except on the most recent continuation, the chain
   drafter's bet, where it is 1: the verifier's measured per-level acceptance ``a`` is that
   bet's, so the tree keeps the chain drafter's proposal as deep as a chain would go and adds
   the other continuations where they are likely enough (a tree is never a worse bet than the
   chain; on the default model, share-only weights measured no better);
4. best-first selection from the root: the node with the highest priority ``weight *
   decay ** depth`` (ties: the one first seen in the most recent continuation, then the
   shallower), until ``budget`` nodes. ``decay``, the verifier's per-level acceptance, makes
   the priority an estimate of the node's acceptance probability (``decay = 1``: counts
   alone). A child's priority never exceeds its parent's, so the kept nodes are the ``budget``
   most likely ones, each kept only with its parent, listed parents first and siblings most
   likely first: the order the acceptance kernels expect, and every prefix of the list is the
   best smaller tree.

With a store (``SuffixIndex.store``) and no suffix of ``CONTEXT_FIRST`` tokens that occurred
before, the store's chain (:func:`store_chain`) goes in as the most recent continuation, the
bet, with the continuations of this text's one-token suffix beside it.
"""

from __future__ import annotations

import heapq

from pipespec_fast.stages.ngram_index import CONTEXT_FIRST, SuffixIndex
from pipespec_fast.stages.tree import DraftTree

EMPTY = DraftTree((), (), ())


def matched_continuations(index: SuffixIndex, max_depth: int, max_occurrences: int,
                          min_match: int = 1) -> tuple[list[list[int]], int]:
    """``(continuations, match_len)`` after the end of ``index.tokens``: what followed each
    of the ``max_occurrences`` most recent earlier occurrences of the longest suffix of length
    ``>= min_match`` that occurred before (most recent first, each at most ``max_depth``
    tokens); ``([], 0)`` when no such suffix occurred."""
    h = index.tokens
    last = len(h) - 1
    if last < 0 or max_depth < 1 or max_occurrences < 1:
        return [], 0
    lo = index.min_n
    for n in range(min(index.max_n, last + 1), max(lo, min_match) - 1, -1):
        ends = index.ends[n - lo].get(tuple(h[last - n + 1 :]))
        if ends is None or len(ends) < 2:  # ends[-1] is `last` itself
            continue
        earlier = ends[-1 - max_occurrences : -1]
        return [h[e + 1 : e + 1 + max_depth] for e in reversed(earlier)], n
    return [], 0


def continuation_trie(continuations: list[list[int]], budget: int, decay: float = 1.0
                      ) -> DraftTree:
    """The trie of ``continuations`` (most recent first) cut to its ``budget`` most likely
    nodes (module doc, steps 3 and 4); weights: 1 on the most recent continuation, elsewhere
    counts over ``len(continuations)``."""
    if budget < 1 or not continuations:
        return EMPTY
    # node id -> token, parent id (-1: root), count, rank (first continuation through it)
    token: list[int] = []
    parent: list[int] = []
    count: list[int] = []
    rank: list[int] = []
    depth: list[int] = []
    children: list[dict[int, int]] = []
    roots: dict[int, int] = {}
    for r, cont in enumerate(continuations):
        kids, par = roots, -1
        for t in cont:
            node = kids.get(t)
            if node is None:
                node = len(token)
                kids[t] = node
                token.append(t)
                parent.append(par)
                count.append(0)
                rank.append(r)
                depth.append(0 if par < 0 else depth[par] + 1)
                children.append({})
            count[node] += 1
            kids, par = children[node], node
    total = len(continuations)

    def weight(c: int) -> float:
        return 1.0 if rank[c] == 0 else count[c] / total

    def key(c: int) -> tuple[float, int, int, int]:
        return -weight(c) * decay ** depth[c], rank[c], depth[c], c

    frontier = [key(c) for c in roots.values()]
    heapq.heapify(frontier)
    out_of: dict[int, int] = {}  # trie node -> its index in the tree
    toks, pars, weights = [], [], []
    while frontier and len(toks) < budget:
        _, _, _, node = heapq.heappop(frontier)
        out_of[node] = len(toks)
        toks.append(token[node])
        pars.append(-1 if parent[node] < 0 else out_of[parent[node]])
        weights.append(weight(node))
        for c in children[node].values():
            heapq.heappush(frontier, key(c))
    return DraftTree(tuple(toks), tuple(pars), tuple(weights))


def ngram_tree(index: SuffixIndex, budget: int, max_depth: int, max_occurrences: int = 32,
               min_match: int = 1, decay: float = 1.0) -> tuple[DraftTree, int]:
    """``(tree, match_len)``: the tree after the end of ``index.tokens`` (module doc), at most
    ``budget`` nodes and ``max_depth`` levels; empty with ``match_len == 0`` when neither a
    suffix of length ``>= min_match`` occurred before nor the store (if any) holds a context
    of that length."""
    if index.store is None:
        conts, n = matched_continuations(index, max_depth, max_occurrences, min_match)
        return continuation_trie(conts, budget, decay), n
    # with a store: the text's own matches of CONTEXT_FIRST tokens or more come first, then
    # the store's chain (a context of at least min_match tokens) beside the text's shorter ones
    conts, n = matched_continuations(index, max_depth, max_occurrences,
                                     max(min_match, CONTEXT_FIRST))
    if n:
        return continuation_trie(conts, budget, decay), n
    conts, n = matched_continuations(index, max_depth, max_occurrences, min_match)
    chain, m = store_chain(index, max_depth)
    if chain and m >= min_match:  # the store's bet first, as the chain drafter proposes it
        conts, n = [chain, *conts], max(n, m)
    return continuation_trie(conts, budget, decay), n


def store_chain(index: SuffixIndex, max_depth: int) -> tuple[list[int], int]:
    """``(tokens, match_len)``: up to ``max_depth`` tokens after the end of ``index.tokens``,
    each the store's proposal for the text so far (``index.store``); ``match_len``: the
    context length of the first (``([], 0)``: the store holds none)."""
    text = list(index.tokens)
    out: list[int] = []
    first = 0
    for _ in range(max_depth):
        tok, m = index.store.lookup(text)
        if not m:
            break
        first = first or m
        out.append(tok)
        text.append(tok)
    return out, first
