"""A model drafter's token tree: its greedy chain, with siblings where it is unsure.

The chain is what the drafter would propose anyway (one forward per level, its argmax after
each); where its own probability of the chosen token is under :data:`CONFIDENT`, the next
``siblings`` most likely tokens hang beside it as leaves. The leaves cost no forward of the
drafter (they come from the row the chain token came from), only one verify row each, and the
verifier's cost model (``tree_step.worth_verifying``) keeps those that pay. This is the part of
EAGLE-2's dynamic tree that fits a CPU drafter: widen only where the drafter is uncertain; the
leaves are not expanded further (each expansion would be another forward per level).

Proposals are deterministic given the drafter's state (argmax, not drawn), so under sampling
the verifier accepts them against point-mass rows (``DraftTree.one_hot_rows``): recursive
rejection sampling over siblings then samples without replacement from the verifier's
distribution, lossless whatever the drafter proposes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipespec_fast.errors import NonFiniteLogitsError
from pipespec_fast.stages.tree import DraftTree

CONFIDENT = 0.8  # the drafter's probability of its token above which no sibling is added
SIBLINGS = 2  # siblings beside an unsure chain token (the next most likely tokens)


def chain_tree(step: Callable[[int], torch.Tensor], root: torch.Tensor, budget: int,
               max_depth: int, decay: float = 1.0, siblings: int = SIBLINGS,
               confident: float = CONFIDENT) -> DraftTree:
    """The drafter's greedy chain of ``max_depth`` tokens after ``root``, with up to
    ``siblings`` leaves beside each chain token whose probability is under ``confident``.

    Args:
        step: feeds one token to the drafter and returns its ``[V]`` logits after it.
        root: ``[V]`` the drafter's logits after its whole history.
        budget: the most nodes kept (the best first, see below).
        max_depth: the chain's length (``max_depth - 1`` calls of ``step``).
        decay: the verifier's per-level acceptance: a node's priority is ``weight * decay **
            (depth + 1)``; nodes are listed by priority, parents first.

    A node's weight is its path's probability relative to the chain's (the product, along the
    path, of the drafter's ``q(token) / q(argmax)``): 1 on the chain, as a drafter's primary
    path in :class:`DraftTree`.
    """
    if budget <= 0 or max_depth <= 0:
        return DraftTree((), (), ())
    tokens: list[int] = []
    parents: list[int] = []
    weights: list[float] = []
    depths: list[int] = []
    logits, parent = root, -1
    for depth in range(max_depth):
        top_p, top_i = torch.softmax(logits.float(), -1).topk(min(1 + siblings,
                                                                  logits.shape[-1]))
        probs, ids = top_p.tolist(), top_i.tolist()
        if not all(math.isfinite(q) for q in probs):  # NaN or +inf logits: no token
            raise NonFiniteLogitsError("non-finite logits (NaN or +inf) in the drafter's row: "
                                       "no tree can be grown")
        chain = len(tokens)
        tokens.append(ids[0])
        parents.append(parent)
        weights.append(1.0)
        depths.append(depth)
        if probs[0] < confident and probs[0] > 0:
            for q, t in zip(probs[1:], ids[1:], strict=True):
                if q > 0:
                    tokens.append(t)
                    parents.append(parent)
                    weights.append(q / probs[0])
                    depths.append(depth)
        if depth + 1 < max_depth:
            logits, parent = step(ids[0]), chain
    return _best_first(tokens, parents, weights, depths, budget, decay)


def _best_first(tokens, parents, weights, depths, budget: int, decay: float) -> DraftTree:
    """The nodes sorted by priority (ties: the order they were made in, so parents, whose
    priority is never lower than their children's, stay first), the first ``budget``."""
    prio = [w * decay ** (d + 1) for w, d in zip(weights, depths, strict=True)]
    order = sorted(range(len(tokens)), key=lambda i: (-prio[i], i))[:budget]
    kept = set(order)
    order = [i for i in order if parents[i] < 0 or parents[i] in kept]  # whole paths only
    where = {old: new for new, old in enumerate(order)}
    return DraftTree(tuple(tokens[i] for i in order),
                     tuple(-1 if parents[i] < 0 else where[parents[i]] for i in order),
                     tuple(weights[i] for i in order))
