"""The three roles of a PipeSpec stage worker (PipeSpec's "lookahead 0" work policy).

* :class:`DrafterWorker` (the lowest model stage): drafts one token at a time while it is
  fewer than ``max_lead`` tokens ahead of the stage above.
* :class:`MiddleWorker`: verifies whatever the stage below offers and, when nothing is offered,
  extends its sequence with its own model, within its own lead.
* :class:`TargetWorker`: verifies what is offered (or what its skip-level drafter proposes),
  waits when the stage below has not spoken yet for its next position, decodes one token alone
  when the stage below has spoken only guesses or is not worth waiting for, and sends every
  verified token to the caller.

A verifying stage sizes each verification with its adaptive window
(``Sequencer.window``; the cost of a draft is its own measured wait for drafts), pauses the
model stage below while that window is 0, and tells the stage below its sequence (a Sync) after
every step and before it waits, so a diverged stage below always learns it (a paused one: once,
when it is resumed). The target's regime bandit (``decoding/regime.py``) may leave the model
stage below out (paused) for whole epochs: ``lean`` (skip-level n-gram drafts only), ``alone``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipespec_fast.decoding.regime import ALONE, FULL
from pipespec_fast.decoding.tree_step import verify_tree
from pipespec_fast.pipespec.inline import InlineDrafter
from pipespec_fast.pipespec.messages import PAUSE, RESUME, Emit, Sync
from pipespec_fast.pipespec.mirror import Mirror
from pipespec_fast.pipespec.worker import StageWorker
from pipespec_fast.stages.tree import DraftTree

SyncKey = tuple[int, int] | None  # (first position sent, our length) of the last Sync sent


class DrafterWorker(StageWorker):
    """The lowest model stage: drafts within its lead."""

    def step(self) -> bool:
        if not self._lead_ok():
            return False
        self._draft()
        return True


class _Verifier(StageWorker):
    """What a middle stage and the target share: drafts from the stage below (a worker, or a
    drafter run inline), the window, pausing the stage below, and syncing it.

    ``window``: the most drafts verified in one forward. ``tree_budget`` (set by the
    topology; 0: chains): the drafter run inline here proposes token trees of up to that many
    nodes, as deep as the window, verified in one forward each (``decoding/tree_step.py``).
    """

    def __init__(self, *args, window: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window = window
        self.below: StageWorker | None = None  # a model stage in its own thread, or ...
        self.inline: InlineDrafter | None = None  # ... a drafter run here (topology)
        self._below_wanted = True  # what we last told the stage below
        self._last_sync: SyncKey = None
        # what a draft costs us: our wait for drafts, per draft verified (decayed); the
        # adaptive window weighs it like synchronous decoding weighs drafting time
        self.wait_per_draft_s = 0.0
        self._waited_s = 0.0
        self._waiting_for_drafts = False  # set by step(): a wait now is a wait for drafts
        self._after_resume = False  # the next drafts from below are the first since a resume
        self.tree_budget = 0

    def _begin(self, prompt: list[int]) -> None:
        if self.inline is not None:  # its mirror is ours: it keeps it an exact copy
            self.inline.start(prompt)
            self.mirror = self.inline.mirror
        else:
            self.mirror = Mirror(prompt)
        self._begin_helpers(prompt)
        self.s.start(prompt, prefill=not self.defer_prefill)

    def _begin_helpers(self, prompt: list[int]) -> None:
        pass

    def _wait(self) -> float:
        self._sync_down()  # a diverged stage below must learn it, even when we wait
        dt = super()._wait()
        if self._waiting_for_drafts:  # (not for the stage above)
            self._waited_s += dt
        return dt

    def _window(self) -> int:
        """Our window for the drafts below now (0: speculation does not pay now, drafts cost
        more waiting than they give); pauses or resumes a model stage below to match, and
        lets an inline drafter fill it."""
        n = self.s.window(self.window, self.wait_per_draft_s)
        self._set_below_wanted(n > 0)
        if self.inline is not None and not self.tree_budget:
            self.inline.fill(self.s.seq, n)
        return n

    def _set_below_wanted(self, wanted: bool) -> None:
        """Resume the model stage below (``wanted``) or pause it (it then leaves us the cores
        and only follows our syncs), when that changes."""
        if self.below is None or wanted == self._below_wanted:
            return
        self._below_wanted = wanted
        if wanted:  # what it missed while paused, before it drafts again
            self._sync_down()
            # the wait for its first drafts includes its catch-up (a deferred prefill): not a
            # cost per draft
            self._after_resume = True
        self.below.inbox.put(RESUME if wanted else PAUSE)  # a resume wakes it at once

    def _inline_tree(self, depth: int) -> DraftTree | None:
        """A tree from the drafter run inline, ``depth`` levels deep, after our whole sequence
        (told to it first); ``None`` when it has none (no match, or ``depth`` 0)."""
        if depth <= 0:
            return None
        self._sync_down()
        tree = self.inline.tree(self.s.seq, self.tree_budget, depth, self.s.policy.acceptance)
        return tree if len(tree) else None

    def _offered(self, n: int, mirror: Mirror | None = None
                 ) -> tuple[list[int], list[torch.Tensor] | None, bool]:
        """Up to ``n`` usable drafts from ``mirror`` (default: the stage below's), see
        :meth:`Mirror.offer`."""
        return (mirror or self.mirror).offer(self.s.seq, n, not self.s.params.greedy)

    def _verify(self, drafts: list[int], rows: list[torch.Tensor] | None,
                from_below: bool, tree: DraftTree | None = None) -> None:
        """Verify ``drafts`` (none: decode one token alone) or ``tree``, publish, sync the
        stage below."""
        count = len(drafts) if tree is None else len(tree)
        if count and from_below and self._after_resume:
            self._after_resume = False
        elif count and from_below:
            cost = self._waited_s / count
            self.wait_per_draft_s = 0.8 * self.wait_per_draft_s + 0.2 * cost
        self._waited_s = 0.0
        start = len(self.s.seq)
        if tree is None:
            self.s.verify(drafts, rows, ready=self.mirror.ready if from_below else None)
        else:
            verify_tree(self.s, tree)
        self._publish(start)
        self._sync_down()

    def _sync_down(self) -> None:
        """Tell the stage below our sequence from the first place its copy may differ; a
        paused model stage below is told once, when it is resumed (each Sync would wake its
        thread, which takes the interpreter lock from ours)."""
        if self.below is not None and not self._below_wanted:
            return
        deliver = self.below.inbox.put if self.below is not None else self.inline.sync
        self._last_sync = self._send_sync(deliver, self.mirror, self._last_sync)

    def _send_sync(self, deliver: Callable[[Sync], None], mirror: Mirror, last: SyncKey
                   ) -> SyncKey:
        """Deliver a Sync of our sequence from the first place ``mirror`` differs, unless it
        would repeat ``last`` (the previous one sent there) with nothing new; returns the new
        last."""
        seq = self.s.seq
        c = mirror.common_prefix(seq)
        key = (c, len(seq))
        if key == last and c == len(seq):
            return last
        deliver(Sync(c, seq[c:]))
        return key


class MiddleWorker(_Verifier):
    """A stage between the drafter and the target: verifies what is offered, else drafts."""

    def step(self) -> bool:
        self._waiting_for_drafts = lead_ok = self._lead_ok()
        if not lead_ok:
            return False
        n = self._window()
        if self.tree_budget and self.inline is not None:
            tree = self._inline_tree(n)
            if tree is not None:
                self._verify([], None, from_below=True, tree=tree)
                return True
            drafts, rows = [], None
        else:
            drafts, rows, _ = self._offered(n)
        if drafts:
            self._verify(drafts, rows, from_below=True)
        else:
            self._draft()
            self._sync_down()
        return True


class TargetWorker(_Verifier):
    """The last stage: verifies until it holds ``limit`` tokens; its tokens go to the caller.

    ``skip`` (set by the topology): a second copy of a model-free lowest stage, run inline on
    the target's own sequence, whose free proposals it verifies when the model stage below has
    nothing usable ready or is not worth waiting for.
    """

    def __init__(self, *args, limit: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.skip: InlineDrafter | None = None
        self._last_skip_sync: SyncKey = None
        self._waiting_for_drafts = True
        # verified tokens go to the caller every ``emit_every`` tokens, at the limit and at a
        # token of ``stop_ids`` (``PipeSpecRun``: 1 when someone reads them as they come;
        # more for generate(), so that the caller's thread does not wake at every step and
        # take a core from our forward, which runs on both)
        self.emit_every = 1
        self.stop_ids: frozenset[int] = frozenset()
        self._unsent: int | None = None  # first position not yet sent to the caller

    def _begin_helpers(self, prompt: list[int]) -> None:
        if self.skip is not None:
            self.skip.start(prompt)

    def _begin(self, prompt: list[int]) -> None:
        super()._begin(prompt)
        if self.s.regimes is not None:  # the regime epochs count from the first step
            self.s.regimes.begin(time.perf_counter())

    def _regime(self) -> str:
        """The regime of this step (``decoding/regime.py``): ``full`` without a bandit."""
        return FULL if self.s.regimes is None else self.s.regimes.arm

    def _pause_below(self) -> int:
        """Leave the model stage below out of this step (``lean``, ``alone``). Returns the
        window for it: 0."""
        self._set_below_wanted(False)
        return 0

    def step(self) -> bool:
        s = self.s
        regime = self._regime()
        s.use_regime_policy()
        room = self.limit - len(s.seq)
        if room <= 0:
            return False
        # at most room - 1 drafts: a verification commits its own token after those accepted
        # (the last token: no window, no drafts to ask for or wait for)
        n = self._window() if regime == FULL and room > 1 else self._pause_below()
        if self.tree_budget and self.inline is not None:  # trees from the drafter below
            return self._tree_step(min(n, room - 1), room)
        drafts, rows, spoke = self._offered(min(n, room - 1))
        skip = not drafts and self.skip is not None and regime != ALONE and room > 1
        if skip and self.tree_budget:
            tree = self._skip_tree(room)
            if tree is not None:
                self._verify([], None, from_below=False, tree=tree)
                return True
            drafts, rows = [], None
        elif skip:
            drafts, rows = self._skip_drafts(room)
        # go on alone when the stage below only offers guesses, or when our window is 0
        if drafts or spoke or n == 0:
            self._verify(drafts, rows, from_below=not skip)
            return True
        return False

    def _tree_step(self, depth: int, room: int) -> bool:
        """Verify a tree from the drafter run inline below us, or decode one token alone
        when it has none."""
        if room <= 0:
            return False
        tree = self._inline_tree(depth)
        self._verify([], None, from_below=tree is not None, tree=tree)
        return True

    def _skip_tree(self, room: int) -> DraftTree | None:
        """A tree from the skip-level drafter (free: the window for free drafts, as
        :meth:`_skip_drafts`), or ``None``."""
        s, sk = self.s, self.skip
        g = min(s.policy.plan(self.window, 0.0) or 0, room - 1)
        if g <= 0:
            return None
        self._last_skip_sync = self._send_sync(sk.sync, sk.mirror, self._last_skip_sync)
        tree = sk.tree(s.seq, self.tree_budget, g, s.policy.acceptance)
        return tree if len(tree) else None

    def _skip_drafts(self, room: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """Drafts from the skip-level drafter: free, so the window is the one for drafts that
        cost nothing (``WindowPolicy.plan``, no exploration state)."""
        s, sk = self.s, self.skip
        g = s.policy.plan(self.window, 0.0)
        if not g:
            return [], None
        self._last_skip_sync = self._send_sync(sk.sync, sk.mirror, self._last_skip_sync)
        sk.fill(s.seq, g)
        drafts, rows, _ = self._offered(min(g, room - 1), sk.mirror)
        return drafts, rows

    def _publish(self, start: int) -> None:
        """Send the tokens verified since the last Emit to the caller when they are due
        (``emit_every``); count the step for the regime bandit."""
        seq = self.s.seq
        if self._unsent is None:
            self._unsent = start
        if (len(seq) - self._unsent >= self.emit_every or len(seq) >= self.limit
                or (self.stop_ids and not self.stop_ids.isdisjoint(seq[start:]))):
            self.out.put(Emit(seq[self._unsent:]))
            self._unsent = None
        if self.s.regimes is not None:
            self.s.regimes.note_step(len(self.s.seq) - start, time.perf_counter())
