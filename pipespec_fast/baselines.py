"""Token generators for the modes that run on the caller's thread: autoregressive decoding of the
target, and synchronous (draft-then-verify) speculative decoding, chained for k > 2 stages.

Each generator takes started :class:`Sequencer` objects (one per stage, target last), yields
lists of newly verified target tokens and stops once the target holds ``limit`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipespec_fast.sequencer import Sequencer, usable_drafts


def autoregressive(target: Sequencer, limit: int) -> Iterator[list[int]]:
    """One target forward per token."""
    while len(target.seq) < limit:
        start = len(target.seq)
        target.draft(1)
        yield target.seq[start:]


def _propose(levels: list[Sequencer], level: int, gamma: list[int], limit: int) -> int:
    """Grow ``levels[level]`` by about ``gamma[level + 1]`` tokens; returns how many it added.

    Level 0 drafts autoregressively; a higher level repeatedly verifies what the level below
    proposes (recursively), so every level's tokens follow its own model's distribution.
    """
    me = levels[level]
    cost = (me.draft_cost_s or 0.0) if level == 0 else 0.0
    want = max(1, min(levels[level + 1].window(gamma[level + 1], cost), limit - len(me.seq)))
    if level == 0:
        return me.draft(want)
    below = levels[level - 1]
    added = 0
    while added < want:
        start = len(me.seq)
        _propose(levels, level - 1, gamma, limit)
        drafts = usable_drafts(below.seq[start:], below.confident[start:])
        rows = None if me.params.greedy else below.probs[start:]
        me.verify(drafts, rows)
        below.apply_sync(start, me.seq[start:])
        added += len(me.seq) - start
    return added


def _draft_cost(levels: list[Sequencer]) -> float:
    """Seconds the levels below the target spend per draft token they deliver (chained: the
    drafter's cost only; the verifying levels in between are not counted)."""
    return (levels[0].draft_cost_s or 0.0) if len(levels) == 1 else 0.0


def synchronous(levels: list[Sequencer], gamma: list[int], limit: int) -> Iterator[list[int]]:
    """Synchronous speculative decoding: the stage below drafts ``gamma[-1]`` tokens (itself
    speculatively when it has a stage below), the target verifies them in one forward, the
    drafters roll back to the target's sequence, repeat."""
    target = levels[-1]
    below = levels[-2]
    while len(target.seq) < limit:
        start = len(target.seq)
        _propose(levels, len(levels) - 2, gamma, limit)
        end = start + min(target.window(gamma[-1], _draft_cost(levels[:-1])), limit - start)
        drafts = usable_drafts(below.seq[start:end], below.confident[start:end])
        rows = None if target.params.greedy else below.probs[start : start + len(drafts)]
        target.verify(drafts, rows)
        below.apply_sync(start, target.seq[start:])
        for lo in range(len(levels) - 3, -1, -1):  # cascade the rollback down
            levels[lo].apply_sync(start, levels[lo + 1].seq[start:])
        yield target.seq[start:]
