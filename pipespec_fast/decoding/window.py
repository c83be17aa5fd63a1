"""The adaptive verification window: how many drafts a stage verifies in its next forward.

The rule is the analytical model's (``pipespec_fast.analysis``), fed with what the stage has
measured: its per-token acceptance ``a`` (``analysis.acceptance_estimate`` over decayed
counts), its verify latency ``L(n)`` (``analysis.LatencyModel.fit`` through the decayed mean
latency of each block size, weighted by how often it ran) and what one draft costs it ``d``;
the window is ``analysis.best_window``: the ``g`` that maximises
``A(a, g) / (L(g + 1) + g * d)`` committed tokens per second.

``g = 0`` means "decode one token alone": speculation is off while it does not pay (a
compute-bound verifier, a draft that keeps it waiting), with one exploratory draft after 8,
16, 32, 64 steps alone to keep ``a``, ``L`` and ``d`` current. Until two block sizes have been
timed, and always for seeded sampling in a reproducible mode (ar, sync: their draws must not
depend on timings), the rule is
acceptance only: the smallest ``g`` with ``a^g <= 0.15``. Without timings ever (seeded sync),
``g = 0`` below an acceptance of 0.5, with the same explorations, and above it the rule on
fixed costs instead of measured ones (:func:`untimed_window`): the
acceptance-only rule's long windows (6 drafts at ``a = 0.74``) kept seeded sync at 0.83x of AR
on HumanEval at T = 0.7, drafting through the easy start of an answer and on after it. Drafts
that cost the verifier nothing (``free``: a model-free drafter's, the n-gram drafter run on the
verifier's thread) have no such floor: the fixed line alone decides (one draft pays from an
acceptance of 0.08 on it).
"""

from __future__ import annotations

import math

from pipespec_fast.analysis import acceptance_estimate, best_window_linear, weighted_line


class WindowPolicy:
    """One stage's window rule and the measurements it decides from.

    Args:
        timed: the rule may use latencies (greedy, unseeded sampling, any PipeSpec run);
            ``False`` keeps a seeded ar/sync generation's windows, and draws, timing-free.
        adaptive: ``False`` always answers the largest window allowed.
        free: its drafts cost it nothing (a model-free drafter's; :func:`untimed_window`).

    The rule is re-evaluated only after a new measurement (``note_*``): a worker may ask for
    its window once per message it receives."""

    EXPLORE_EVERY, EXPLORE_MAX = 8, 64  # one draft after 8 steps alone, doubling up to 64
    VERIFY_MAX_N = 64  # block sizes above this (a prompt fed with drafts) are not verify steps
    DECAY_COUNTS = 0.9  # per verification, of the acceptance counts
    DECAY_LATENCY = 0.95  # per verification, of each block size's weight in the fit
    BEFORE_TIMINGS_TAIL = 0.15  # acceptance-only rule: smallest g with a^g <= this

    def __init__(self, timed: bool, adaptive: bool = True, free: bool = False) -> None:
        self.timed = timed
        self.adaptive = adaptive
        self.free = free
        self.accepted = 0.0  # decayed count of accepted drafts
        self.rejections = 0.0  # decayed count of verifications that ended in a rejection
        # block size n -> (decayed mean latency in s, decayed weight)
        self.latency: dict[int, tuple[float, float]] = {}
        self._line: tuple[float, float] | None = None
        self._line_stale = False  # a latency was noted since the line was fitted
        self._alone_steps = 0  # consecutive choose() == 0 answers
        self._explore_every = self.EXPLORE_EVERY  # doubles while explorations keep failing
        # plan() answers by (max_n, draft cost), valid until the next measurement (a target
        # with skip-level drafts asks for two costs per step: one entry would thrash)
        self._plans: dict[tuple[int, float], int | None] = {}
        self._changed()

    def set_state(self, accepted: float, rejections: float,
                  latency: dict[int, tuple[float, float]]) -> None:
        """Start from recorded measurements (counts, ``n -> (mean s, weight)``)."""
        self.accepted, self.rejections, self.latency = accepted, rejections, dict(latency)
        self._changed()

    # ------------------------------------------------------------------ measurements

    def note_verify(self, drafts: int, accepted: int) -> None:
        """A verification of ``drafts`` drafts accepted ``accepted`` of them."""
        if drafts:
            self.accepted = self.DECAY_COUNTS * self.accepted + accepted
            self.rejections = self.DECAY_COUNTS * self.rejections + float(accepted < drafts)
            self._plans.clear()

    def note_latency(self, n: int, seconds: float) -> None:
        """A verify forward over ``n`` tokens took ``seconds``. Every size's weight decays at
        each step, so sizes not seen for a while (a slow warm-up, a burst of contention) fade
        out of the fit."""
        if n > self.VERIFY_MAX_N:
            return
        seconds = max(seconds, 1e-9)  # a clock that did not move: the fit needs times > 0
        lat = self.latency
        for k in list(lat):
            m, w = lat[k]
            if w * self.DECAY_LATENCY < 0.05:
                del lat[k]
            else:
                lat[k] = (m, w * self.DECAY_LATENCY)
        mean, w = lat.get(n, (seconds, 0.0))
        w += 1.0
        lat[n] = (mean + (seconds - mean) / min(w, 5.0), w)
        self._changed()

    def _changed(self) -> None:
        self._line_stale = True  # fitted when a decision needs it (never for fixed windows)
        self._plans.clear()

    @property
    def acceptance(self) -> float:
        """The recent per-token acceptance ``a``, smoothed towards 1/2 (Laplace's rule)."""
        return acceptance_estimate(self.accepted, self.rejections, prior=1.0)

    def line(self) -> tuple[float, float] | None:
        """``(a, b)`` of ``L(n) = a + b n`` through the recent verify latencies
        (``analysis.weighted_line``, each block size's decayed mean weighted by its decayed
        count); ``None`` before two sizes were timed, or when the line is not positive at
        ``n = 1`` (noise: the acceptance-only rule decides then)."""
        if self._line_stale:
            pts = self.latency
            line = None
            if len(pts) >= 2:
                a, b = weighted_line(list(pts), [m for m, _ in pts.values()],
                                     [w for _, w in pts.values()])
                line = (a, b) if a + b > 0 else None
            self._line, self._line_stale = line, False
        return self._line

    # ------------------------------------------------------------------ decisions

    def choose(self, max_n: int, draft_cost_s: float = 0.0) -> int:
        """The window for the next forward (``0``: decode one token alone), with the
        exploration: after :data:`EXPLORE_EVERY` answers of 0 in a row, one draft (the
        interval doubles, up to :data:`EXPLORE_MAX`, while speculation keeps not paying: an
        exploration costs a wait for a draft in PipeSpec). ``draft_cost_s``: what producing
        one more draft costs this stage's timeline (the drafter's step in synchronous
        decoding, the measured wait per draft in PipeSpec)."""
        if not self.adaptive:
            return max_n
        best = self.plan(max_n, draft_cost_s)
        if best is None:
            return 0  # one step alone times L(1): with the verify size seen, a line
        if best == 0:
            self._alone_steps += 1
            if self._alone_steps < self._explore_every:
                return 0
            self._explore_every = min(self.EXPLORE_MAX, 2 * self._explore_every)
            best = 1
        else:
            self._explore_every = self.EXPLORE_EVERY
        self._alone_steps = 0
        return best

    def plan(self, max_n: int, draft_cost_s: float = 0.0) -> int | None:
        """The rule of :meth:`choose` without its exploration state (answers are cached until
        the next measurement): the best ``g`` for drafts costing ``draft_cost_s`` each, or
        ``None`` when one step alone should first time ``L(1)``."""
        if not self.adaptive:
            return max_n
        key = (max_n, draft_cost_s)
        plans = self._plans
        if key not in plans:
            if len(plans) > 8:  # costs that change every step (a decaying wait): keep it small
                plans.clear()
            plans[key] = self._evaluate(max_n, draft_cost_s)
        return plans[key]

    def _evaluate(self, max_n: int, draft_cost_s: float) -> int | None:
        a = self.acceptance
        line = self.line() if self.timed else None
        if line is None:
            if self.timed and self.latency and 1 not in self.latency:
                return None
            if a >= 0.999:
                return max_n
            if not self.timed:  # seeded ar/sync: the rule on fixed costs
                return untimed_window(a, self.free, max_n)
            g = math.ceil(math.log(self.BEFORE_TIMINGS_TAIL) / math.log(a))
            return max(1, min(max_n, g))
        return best_window_linear(line[0], line[1], a, draft_cost_s, max(1, max_n))[0]


# seeded ar/sync (no clock): model drafts are not verified below this acceptance (seeded sync
# at T = 0.7 ran at 0.83-0.89x of AR accepting ~0.3); above it, and for free drafts at any
# acceptance, the window of fixed costs relative to L(1): L(n) = 0.92 + 0.08 n (the default
# int8 target, README) and a sampled model draft at 0.3, a free one at 0
UNTIMED_MIN_ACCEPTANCE = 0.5
UNTIMED_LINE = (0.92, 0.08)
UNTIMED_DRAFT_COST = 0.3


def untimed_window(a: float, free: bool, max_n: int) -> int:
    """The timing-free window (seeded ar/sync) at acceptance ``a`` of drafts that cost the
    verifier nothing (``free``) or a model draft's step."""
    if not free and a < UNTIMED_MIN_ACCEPTANCE:
        return 0
    cost = 0.0 if free else UNTIMED_DRAFT_COST
    return best_window_linear(*UNTIMED_LINE, a, cost, max(1, max_n))[0]


def policy_for(params, reproducible: bool, adaptive: bool = True, free: bool = False
               ) -> WindowPolicy:
    """The policy for a generation with these ``SamplingParams``. Seeded sampling in a
    ``reproducible`` mode (ar, sync) keeps timing-free windows, so that its random draws
    repeat; a seeded PipeSpec run depends on thread timing anyway (which drafts arrive when),
    so it adapts like greedy and unseeded runs."""
    timed = params.greedy or params.seed is None or not reproducible
    return WindowPolicy(timed=timed, adaptive=adaptive, free=free)
