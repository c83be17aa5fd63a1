"""Token generators for the modes that run on the caller's thread: autoregressive decoding of the
target, and synchronous (draft-then-verify) speculative decoding, chained for k > 2 stages.

Each generator takes started :class:`Sequencer` objects (one per stage, target last), yields
lists of newly verified target tokens and stops once the target holds ``limit`` tokens.

With ``tree_budget > 0`` and a tree drafter as the lowest stage (the n-gram drafter), the
stage above it verifies token trees of up to ``tree_budget`` nodes instead of chains, as deep
as its window (``decoding/tree_step.py``); every stage higher up verifies chains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipespec_fast.decoding.regime import ALONE, FULL, has_lean
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.tree_step import draft_tree, verify_tree
from pipespec_fast.stages import is_model_free


def autoregressive(target: Sequencer, limit: int) -> Iterator[list[int]]:
    """One target forward per token."""
    while len(target.seq) < limit:
        start = len(target.seq)
        target.draft(1)
        yield target.seq[start:]


def _propose(levels: list[Sequencer], level: int, want: int, gamma: list[int],
             limit: int, tree_budget: int = 0) -> int:
    """Grow ``levels[level]`` by about ``want`` tokens; returns how many it added.

    Level 0 drafts autoregressively; a higher level repeatedly verifies what the level below
    proposes (recursively, a window it chooses itself each step), so every level's tokens
    follow its own model's distribution. A level whose window is 0 (speculation does not pay
    now) decodes its tokens alone.
    """
    me = levels[level]
    want = max(1, min(want, limit - len(me.seq)))
    if level == 0:
        return me.draft(want)
    added = 0
    while added < want:
        start = len(me.seq)
        g = me.window(gamma[level], _draft_cost(levels[:level]))
        _verify_from_below(levels, level, g, start, gamma, limit, tree_budget)
        added += len(me.seq) - start
    return added


def _verify_from_below(levels: list[Sequencer], level: int, g: int, start: int,
                       gamma: list[int], limit: int, tree_budget: int) -> None:
    """One verify step of ``levels[level]`` at position ``start`` with a window of ``g``: a
    tree from a tree drafter directly below, else a chain; then the levels below roll to it."""
    me = levels[level]
    if g > 0 and tree_budget > 0 and level == 1 and _tree_pair(levels[0], me):
        verify_tree(me, draft_tree(levels[0], tree_budget, g, me.policy.acceptance))
    else:
        drafts, rows = _drafts_from(levels, level, g, start, gamma, limit, tree_budget)
        me.verify(drafts, rows)
    _sync_down(levels, level, start)


def _tree_pair(drafter: Sequencer, verifier: Sequencer) -> bool:
    """The drafter proposes trees and the verifier verifies them."""
    return drafter.stage.capabilities.tree_drafts and verifier.stage.capabilities.trees


def _drafts_from(levels: list[Sequencer], level: int, g: int, start: int, gamma: list[int],
                 limit: int, tree_budget: int = 0) -> tuple[list[int], list | None]:
    """Up to ``g`` drafts for ``levels[level]`` at position ``start`` from the levels below
    (none for ``g = 0``), with their rows under sampling."""
    me, below = levels[level], levels[level - 1]
    if g <= 0:
        return [], (None if me.params.greedy else [])
    _propose(levels, level - 1, g, gamma, limit, tree_budget)
    return below.span.usable(start, g, with_rows=not me.params.greedy)


def _sync_down(levels: list[Sequencer], level: int, start: int) -> None:
    """Roll every level below ``level`` to its sequence from ``start`` (cascading down)."""
    for lo in range(level - 1, -1, -1):
        levels[lo].apply_sync(start, levels[lo + 1].seq[start:], strict=True)


def _draft_cost(levels: list[Sequencer]) -> float:
    """Seconds the levels below the target spend per draft token they deliver (chained: the
    drafter's cost only; the verifying levels in between are not counted)."""
    return (levels[0].draft_cost_s or 0.0) if len(levels) == 1 else 0.0


def synchronous(levels: list[Sequencer], gamma: list[int], limit: int, tree_budget: int = 0,
                skip_level: bool = False) -> Iterator[list[int]]:
    """Synchronous speculative decoding: the stage below drafts the target's window of tokens
    (itself speculatively when it has a stage below), the target verifies them in one forward,
    the drafters roll back to the target's sequence, repeat. A window of 0
    (``Sequencer.window``: speculation does not pay) is one target step alone.

    With a regime bandit on the target (``decoding/regime.py``) each step runs the levels of
    its regime: all of them (``full``), the lowest (n-gram) drafter straight under the target
    (``lean``), or the target alone (``alone``); the levels left out catch up on the target's
    sequence when they are used again.

    ``skip_level`` (with a model-free lowest level under model levels): a ``full`` step whose
    window for the model drafts is 0 verifies the lowest level's free drafts straight instead,
    as PipeSpec's target does with its skip-level drafts (:func:`_skip_level_step`)."""
    target = levels[-1]
    regimes = target.regimes
    lean, lean_gamma = [levels[0], target], [gamma[0], gamma[-1]]
    skip_level = skip_level and has_lean([is_model_free(lv.stage) for lv in levels])
    left_at: int | None = None  # the target's length when the full hierarchy was left
    if regimes is not None:
        regimes.begin(time.perf_counter())
    while len(target.seq) < limit:
        start = len(target.seq)
        regime = FULL if regimes is None else regimes.arm
        if regime == FULL and left_at is not None:
            _catch_up(levels, left_at)
            left_at = None
        elif regime != FULL and left_at is None:
            left_at = start
            levels[0].rewind(start)  # drop what the level above proposed through it
        target.use_regime_policy()
        if regime == ALONE:
            target.verify([], None)
            # the lowest level follows (no forward: its list of tokens), so that a lean step
            # after alone ones drafts from the target's position
            levels[0].apply_sync(start, target.seq[start:], strict=True)
        else:
            lv, gm = (levels, gamma) if regime == FULL else (lean, lean_gamma)
            # at most limit - start - 1 drafts: the verification's own token follows them
            cost = _draft_cost(lv[:-1])
            g = min(target.window(gm[-1], cost), limit - start - 1)
            # (a plan of None: the step alone that times L(1) for the window)
            if (g == 0 and regime == FULL and skip_level and limit - start > 1
                    and target.policy.plan(gm[-1], cost) is not None):
                _skip_level_step(levels, lean_gamma, start, limit, tree_budget)
            else:
                _verify_from_below(lv, len(lv) - 1, g, start, gm, limit, tree_budget)
        if regimes is not None:
            regimes.note_step(len(target.seq) - start, time.perf_counter())
        yield target.seq[start:]


def _skip_level_step(levels: list[Sequencer], lean_gamma: list[int], start: int, limit: int,
                     tree_budget: int) -> None:
    """A ``full`` step at ``start`` whose window for the model levels' drafts is 0: the target
    verifies the lowest (model-free) level's drafts itself, sized by its policy for those
    (``Sequencer.skip_level_policy``; a draft costs what a ``lean`` step's does), or decodes
    alone under that policy when they do not pay either (it times its own ``L(1)``); every
    level below then rolls to the target's sequence (the model levels feed the new tokens at
    their next forward)."""
    target = levels[-1]
    full, target.policy = target.policy, target.skip_level_policy()
    try:
        g = min(target.window(lean_gamma[-1], _draft_cost(levels[:1])), limit - start - 1)
        levels[0].rewind(start)  # its proposals through the model levels: not for us
        _verify_from_below([levels[0], target], 1, g, start, lean_gamma, limit, tree_budget)
    finally:
        target.policy = full
    _sync_down(levels, len(levels) - 1, start)


def _catch_up(levels: list[Sequencer], since: int) -> None:
    """The levels between the lowest and the target, left out since the target held
    ``since`` tokens (they agreed with it up to there), adopt its sequence."""
    seq = levels[-1].seq
    for lv in levels[1:-1]:
        lv.apply_sync(since, seq[since:], strict=True)
    levels[0].apply_sync(since, seq[since:], strict=True)
