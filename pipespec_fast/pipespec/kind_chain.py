"""A chain from an inline drafter that names its drafts' kinds, cut by kind.

The verifier asks the drafter for one draft at a time while every draft so far being accepted
stays likely enough (``decoding/kind_window.FILL_TAIL``: a further one could still pay), then
verifies the prefix with the most expected tokens per second, each draft at its kind's
acceptance (``KindAcceptance.best_prefix``). Unlike the window of one acceptance for all
(``decoding/window.py``), this decides at every step, so a four-token match is verified deep
in text the target copies, and decoding alone is chosen step by step where only weak
proposals (a one-token match, a short store context) are at hand.
"""

from __future__ import annotations

from pipespec_fast.decoding.kind_window import FILL_TAIL
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.pipespec.inline import InlineDrafter


def kind_drafts(s: Sequencer, drafter: InlineDrafter, n: int) -> tuple[list[int], list | None,
                                                                       list[int]]:
    """``(drafts, rows, kinds)``: at most ``n`` drafts from ``drafter`` after ``s``'s
    sequence (module doc; ``rows`` under sampling), and the kind of each."""
    seq, start = s.seq, len(s.seq)
    rates = s.policy.kinds
    p, want = 1.0, 0
    while want < n and p >= FILL_TAIL:
        want += 1
        drafter.fill(seq, want)
        got = drafter.kinds(start + want - 1, 1)
        if not got:  # it did not draft (it disagrees with seq): nothing to offer
            break
        p *= rates.rate(got[0])
    drafts, rows, _ = drafter.mirror.offer(seq, want, not s.params.greedy)
    kinds = drafter.kinds(start, len(drafts))
    line = s.policy.line() if s.policy.timed else None
    g = rates.best_prefix(kinds, line)
    return drafts[:g], (None if rows is None else rows[:g]), kinds[:g]
