"""Which draft sources the target uses, chosen by the tokens per second each really gives.

The window policy (``decoding/window.py``) sizes each verification from a model of the costs
it can see: its verify latencies, its acceptance, its wait per draft. What it cannot see is
what speculation costs outside its own forwards: on a 2-core CPU a drafter's thread slows the
target's forwards and the caller's Python; a resumed drafter first catches up on every token
the target decoded meanwhile; a synchronous step pays the drafter's bookkeeping. Measured end
to end, the 3-level hierarchy ran at 0.89-0.96x of the target alone while its windows said
speculation paid.

So above the windows sits a bandit over *regimes*, judged by wall-clock tokens per second,
everything included:

* ``full``: every stage drafts for the one above (the windows decide as before);
* ``lean``: the model stages between the n-gram drafter and the target are left out (paused):
  the target verifies the n-gram drafter's proposals itself;
* ``alone``: no drafts at all, one target token per forward.

A regime is an arm only where the window cannot price it: a target over model-free drafters
alone has no bandit (its window of 0 is a step alone, and an arm that decodes alone for
whole epochs only lost: 2-7% of tokens/s in a same-run A/B), and where ``lean`` exists it
replaces ``alone`` (its window goes alone step by step where the n-gram's drafts do not pay;
the same A/B on the 3-level hierarchy: -2% to +9%, +3% in the mean over both tasks, greedy
and T = 0.7). ``alone`` stays an arm against a model draft straight under the target.

The target's steps are grouped into epochs of :data:`Regimes.EPOCH_STEPS` steps; each epoch
runs one regime and adds its tokens and seconds to that regime's totals, decayed by half
per epoch since that regime last ran (a retry is judged on the text of now). Each regime
is tried once. A regime ahead of the best by :data:`Regimes.MARGIN` (after its try, a
retry, or because the best's own rate fell) runs one more epoch and takes over only if still
ahead then: one lucky epoch, on a stretch of easy text, had the 3-level hierarchy leave a
regime ~10% faster for the rest of a run. The best runs, and every other is tried again for
one epoch (half of one when it was over 15% slower: a retry of a regime far behind is mostly
a cost) after a wait that doubles (quadruples when it was over 15% slower; up to
:data:`Regimes.MAX_WAIT` epochs) each time it loses a comparison, the best it was until a
challenger won included. Waits are never reset: a regime far behind that got lucky does not
come back to frequent explorations.

Where ``alone`` is an arm, another regime's rate is judged at most its tokens per step times
``alone``'s rate (:meth:`Regimes.rates`): a step that verifies drafts is never cheaper than a
step alone, so a regime committing ~1 token per step can be faster than ``alone`` only by the
clock's noise (a model draft under the target on 2 cores: 1.02 tokens per step at 1.14x the
step time, yet measured ahead in some epochs). With fewer than 1 + :data:`Regimes.MARGIN`
tokens per step it cannot lead by the margin, so ``alone``, as fast and cheaper, is ahead
(and its confirmation epoch, which cannot change the other's tokens per step, then only
repeats the verdict).

A generation's last epoch, cut short, counts when it ran at least half a full epoch's steps.
The totals and waits outlive a generation (``FastPipeline`` keeps them, ``PolicyMemory``), so
a pipeline that serves many requests pays for its exploration once.

Only timed policies use it (greedy, unseeded sampling, any PipeSpec run): a seeded ``sync``
generation must repeat its draws, so its regime never depends on a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FULL, LEAN, ALONE = "full", "lean", "alone"


# long: the bandit's state (decayed totals, waits, the epoch clock) and its rules, each method
# short; split, one decision would read across two classes
@dataclass
class Regimes:
    """The regime bandit of one pipeline and mode; ``arms``: the regimes available, in the
    order they are first tried (``full`` first)."""

    arms: tuple[str, ...]
    EPOCH_STEPS = 12  # target steps per epoch (one regime per epoch)
    # steps of a regime not timed after it starts (a switch, a generation's start): its stages
    # catch up (a deferred prefill at first), a cost per switch, not the regime's rate
    SETTLE_STEPS = 2
    DECAY = 0.5  # of a regime's token and second totals, per epoch (any regime's) since it ran
    FIRST_WAIT = 4  # a loser's first wait is this, doubled (or 4x): epochs until retried ...
    MAX_WAIT = 64  # ... growing with each loss up to this many
    MARGIN = 0.03  # a challenger must beat the best by this fraction to take over
    FAR_BEHIND = 0.15  # a loser this much slower than the best waits 4x longer, not 2x

    tokens: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    timed_steps: dict[str, float] = field(default_factory=dict)  # decayed as tokens are
    wait: dict[str, int] = field(default_factory=dict)  # epochs until tried again
    countdown: dict[str, int] = field(default_factory=dict)
    arm: str = FULL  # the regime of the current epoch
    best: str = FULL
    epochs: dict[str, int] = field(default_factory=dict)  # epochs run, per regime
    # the target's window policy per regime (``Sequencer.use_regime_policy``)
    policies: dict[str, object] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # this generation's steps, per regime
    _steps: int = 0
    _settle: int = 0  # steps left before the epoch's clock starts
    _epoch_tokens: int = 0
    _epoch_start: float | None = None
    _last: float | None = None  # the end of the epoch's last timed step
    _epoch_len: int = 0  # timed steps of the current epoch (``_length``)
    _closed: int = 0  # epochs closed, every regime's
    _closed_at: dict[str, int] = field(default_factory=dict)  # per regime: its last epoch's
    _confirming: str | None = None  # a regime ahead of the best, running its second epoch

    def __post_init__(self) -> None:
        if not self.arms or self.arms[0] != FULL:
            raise ValueError(f"Regimes: arms must start with {FULL!r}, got {self.arms!r}")
        self.arm = self.best = FULL
        self._epoch_len = self.EPOCH_STEPS

    def rate(self, arm: str) -> float | None:
        """Measured tokens per second of ``arm`` (decayed), ``None`` before its first epoch."""
        s = self.seconds.get(arm)
        return None if not s else self.tokens[arm] / s

    def tokens_per_step(self, arm: str) -> float | None:
        """Measured tokens per timed step of ``arm`` (decayed), ``None`` before its first."""
        n = self.timed_steps.get(arm)
        return None if not n else self.tokens[arm] / n

    def rates(self) -> dict[str, float | None]:
        """Each regime's rate as the bandit judges it (:func:`bounded_rates`)."""
        return bounded_rates({a: self.rate(a) for a in self.arms},
                             {a: self.tokens_per_step(a) for a in self.arms})

    def begin(self, now: float) -> None:
        """A generation's first step starts now (after its prefill): the epoch restarts. The
        last one, cut short, counts (to its last step) when it ran half an epoch's steps:
        else an exploration cut short would rerun whole in the next generation."""
        if 2 * self._steps >= self.EPOCH_STEPS and self._last is not None:
            self.arm = self._close_epoch(self._last)
        self._last = None
        self._epoch_start, self._steps, self._epoch_tokens = now, 0, 0
        self._settle = self.SETTLE_STEPS
        self.steps = {}

    def note_step(self, tokens: int, now: float) -> bool:
        """A target step committed ``tokens`` and ended at ``now``; returns whether the regime
        changed for the next step."""
        if self._epoch_start is None:
            self.begin(now)
            return False
        self.steps[self.arm] = self.steps.get(self.arm, 0) + 1
        if self._settle > 0:  # the regime's first steps (see SETTLE_STEPS): not timed
            self._settle -= 1
            self._epoch_start = now
            return False
        self._steps += 1
        self._epoch_tokens += tokens
        self._last = now
        if self._steps < self._epoch_len:
            return False
        nxt = self._close_epoch(now)
        changed, self.arm = nxt != self.arm, nxt
        if changed:
            self._settle = self.SETTLE_STEPS
        return changed

    def _close_epoch(self, now: float) -> str:
        """The current epoch ends at ``now``: its tokens and seconds join its regime's decayed
        totals. Returns the regime of the next epoch."""
        arm, dt = self.arm, now - self._epoch_start
        self._closed += 1
        # decay per epoch since the regime last ran: a retry is judged on the text of now
        decay = self.DECAY ** (self._closed - self._closed_at.get(arm, self._closed - 1))
        self._closed_at[arm] = self._closed
        self.tokens[arm] = decay * self.tokens.get(arm, 0.0) + self._epoch_tokens
        self.seconds[arm] = decay * self.seconds.get(arm, 0.0) + max(dt, 1e-9)
        self.timed_steps[arm] = decay * self.timed_steps.get(arm, 0.0) + max(self._steps, 1)
        self.epochs[arm] = self.epochs.get(arm, 0) + 1
        self._epoch_start, self._steps, self._epoch_tokens, self._last = now, 0, 0, None
        nxt = self._choose(arm)
        self._epoch_len = self._length(nxt)
        return nxt

    def _length(self, arm: str) -> int:
        """Steps of an epoch of ``arm``: half of :data:`EPOCH_STEPS` to retry a regime far
        behind the best (such a retry is mostly a cost), else all of them."""
        rates = self.rates()
        r, best = rates[arm], rates[self.best]
        if arm != self.best and r is not None and best and r < best * (1 - self.FAR_BEHIND):
            return max(1, self.EPOCH_STEPS // 2)
        return self.EPOCH_STEPS

    def _choose(self, ran: str) -> str:
        untried = [a for a in self.arms if a not in self.seconds]
        if untried:
            return untried[0]
        rates = self.rates()
        rival = max((a for a in self.arms if a != self.best), key=lambda a: rates[a])
        ahead = rates[rival] > rates[self.best] * (1 + self.MARGIN) or (
            rival == ALONE and self.tokens_per_step(self.best) < 1 + self.MARGIN)
        if ahead and ran == rival == self._confirming:
            self._take_over(rival, rates)  # ahead after two epochs of its own in a row
        elif ahead:  # an exploration won, or the best's own rate fell (the text changed):
            if ran not in (self.best, rival):
                self._lost(ran, rates)
            self._confirming = rival  # one epoch more before it takes over (luck is no win)
            return rival
        elif ran != self.best:  # an exploration (or a confirmation) lost
            self._lost(ran, rates)
        self._confirming = None
        for a in self.arms:
            if a != self.best:
                if a not in self.wait:  # never compared yet (a middle one of the first tries)
                    self._lost(a, rates)
                self.countdown[a] = self.countdown.get(a, self.FIRST_WAIT) - 1
        due = [a for a in self.arms if a != self.best and self.countdown[a] <= 0]
        if due:
            a = min(due, key=lambda x: self.countdown[x])
            self.countdown[a] = self.wait.get(a, self.FIRST_WAIT)
            return a
        return self.best

    def _take_over(self, arm: str, rates: dict) -> None:
        """``arm`` is the new best; the one it displaced waits as a loser (no wait resets)."""
        old, self.best = self.best, arm
        self.countdown.pop(arm, None)
        self._lost(old, rates)

    def _lost(self, arm: str, rates: dict) -> None:
        """``arm`` lost to the best: its wait doubles (quadruples when it lost by far)."""
        grow = 4 if rates[arm] < rates[self.best] * (1 - self.FAR_BEHIND) else 2
        self.wait[arm] = min(self.MAX_WAIT, grow * self.wait.get(arm, self.FIRST_WAIT))
        self.countdown[arm] = self.wait[arm]

    def summary(self) -> dict:
        """This generation's target steps per regime; epochs run, measured tokens/s and tokens
        per timed step per regime and the current best over the pipeline's life (for stats)."""
        return {"best": self.best, "steps": dict(self.steps), "epochs": dict(self.epochs),
                "tokens_per_s": {a: r for a in self.arms if (r := self.rate(a)) is not None},
                "tokens_per_step": {a: r for a in self.arms
                                    if (r := self.tokens_per_step(a)) is not None}}


def bounded_rates(rates: dict[str, float | None], per_step: dict[str, float | None]
                  ) -> dict[str, float | None]:
    """Measured ``rates`` (tokens per second per regime, ``None``: not measured yet), each
    but ``alone``'s bounded by its tokens ``per_step`` times ``alone``'s rate where ``alone``
    is measured: a step with drafts costs at least a step alone, so a faster measurement is
    the clock's noise."""
    alone = rates.get(ALONE)
    if alone is None:
        return dict(rates)
    return {a: r if a == ALONE or r is None else min(r, per_step[a] * alone)
            for a, r in rates.items()}


def arms_for(mode: str, model_free: list[bool], skip_level_drafts: bool) -> tuple[str, ...]:
    """The regimes of a pipeline whose stages (lowest first, target last) are model-free or
    not: ``()`` for ``ar``, a target alone and a target over model-free drafters only (no
    drafter thread to price: the window alone decides, its 0 being a step alone); ``(full,
    lean)`` where an n-gram drafter sits under at least one model stage below the target (in
    PipeSpec it also needs the target's skip-level drafts; ``lean``'s window goes alone where
    the n-gram's drafts do not pay); ``(full, alone)`` otherwise (a model draft straight
    under the target)."""
    if mode == "ar" or len(model_free) < 2 or all(model_free[:-1]):
        return ()
    lean = has_lean(model_free)
    if mode == "pipespec" and not skip_level_drafts:
        lean = False
    return (FULL, LEAN) if lean else (FULL, ALONE)


def has_lean(model_free: list[bool]) -> bool:
    """Leaving the model stages out differs from the whole hierarchy: the lowest stage is
    model-free and a model stage sits between it and the target (stages lowest first)."""
    return len(model_free) > 2 and model_free[0] and not all(model_free[1:-1])
