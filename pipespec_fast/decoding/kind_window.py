"""Windows cut by each draft's kind: how far to trust a chain from the n-gram drafter.

One acceptance for every draft (``decoding/window.py``) fits a model draft, whose chances
change little from one token to the next. The n-gram drafter's do: a draft copied after a
four-token match of the text is accepted ~87% of the time, one from a one-token match ~24%,
one from the store's two-token context ~28% (held-out answers of the distillation prompts,
never the benchmarks', teacher-forced: ``docs/DRAFT.md``). The drafter names what made each
draft (its kind: ``stages/ngram_index.proposal_kind``), so the verifier keeps one acceptance
per kind and verifies the prefix of the chain with the most expected tokens per second:

    g* = argmax_g (1 + sum_{j<=g} prod_{i<=j} a(kind_i)) / (L(g + 1) + g * d)

``L`` the verifier's measured latency line and ``d`` what a draft costs it. On those held-out
answers, simulated with ``L(n) = 3.1 + 0.28 (n - 1)`` ms, this gave 1.65x over decoding alone
against 1.58x for the best single window (``docs/ANALYSIS.md``).

Each kind starts from its held-out acceptance (:data:`PRIORS`, worth
:data:`PRIOR_WEIGHT` verifications) and follows what this verifier measures (counts decayed
by :data:`DECAY` per try of that kind). Pure Python: a handful of multiplications per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipespec_fast.stages.ngram_index import STORE_KIND

# held-out acceptance per kind (module doc): text matches of 1-4 tokens, store contexts of
# 2-6 tokens; longer ones take the longest listed, unknown kinds DEFAULT_PRIOR
PRIORS: dict[int, float] = {
    1: 0.24, 2: 0.55, 3: 0.67, 4: 0.87,
    STORE_KIND + 2: 0.28, STORE_KIND + 3: 0.40, STORE_KIND + 4: 0.45, STORE_KIND + 5: 0.47,
    STORE_KIND + 6: 0.68,
}
DEFAULT_PRIOR = 0.3
PRIOR_WEIGHT = 4.0
DECAY = 0.98
# drafting goes on while the chance that every draft so far is accepted is at least this: a
# further draft adds that chance times its own acceptance to the expected tokens, for ~8% of
# a forward's time (L(n)'s slope on this project's CPU), so below ~0.1 it no longer pays
FILL_TAIL = 0.1
# the latency line's shape before two verify sizes were timed, relative to L(1):
# L(n) = 0.92 + 0.08 n (the default int8 target, README)
UNTIMED_LINE = (0.92, 0.08)


def prior(kind: int) -> float:
    """The starting acceptance of a kind (0, the fallback, is a guess: never accepted)."""
    if kind <= 0:
        return 0.0
    p = PRIORS.get(kind)
    if p is not None:
        return p
    if kind < STORE_KIND:
        return PRIORS[4]
    return PRIORS[STORE_KIND + 6] if kind > STORE_KIND + 6 else DEFAULT_PRIOR


class KindAcceptance:
    """One verifier's acceptance per draft kind, and the window it implies."""

    def __init__(self) -> None:
        self.counts: dict[int, tuple[float, float]] = {}  # kind -> (accepted, tried), decayed

    def rate(self, kind: int) -> float:
        """The kind's acceptance: its prior and its measured tries, pooled."""
        acc, tried = self.counts.get(kind, (0.0, 0.0))
        return (acc + PRIOR_WEIGHT * prior(kind)) / (tried + PRIOR_WEIGHT)

    def note(self, kinds: Sequence[int], accepted: int) -> None:
        """A verification of drafts of ``kinds`` accepted the first ``accepted``: each of those
        was tried and accepted, the next was tried and rejected, the rest were not tried."""
        for j, k in enumerate(kinds[: accepted + 1]):
            acc, tried = self.counts.get(k, (0.0, 0.0))
            self.counts[k] = (DECAY * acc + (j < accepted), DECAY * tried + 1.0)

    def best_prefix(self, kinds: Sequence[int], line: tuple[float, float] | None,
                    draft_cost_s: float = 0.0) -> int:
        """How many of the drafts of ``kinds`` (in order) to verify: the ``g`` with the most
        expected tokens per second (module doc); ``line``: ``(a, b)`` of the verifier's
        ``L(n) = a + b n`` in seconds (``None``: :data:`UNTIMED_LINE`, drafts free)."""
        if line is None:
            (a, b), d = UNTIMED_LINE, 0.0
        else:
            (a, b), d = line, draft_cost_s
        best_g, expected, p = 0, 1.0, 1.0
        best = 1.0 / (a + b)
        for g, k in enumerate(kinds, 1):
            p *= self.rate(k)
            if p <= 0.0:
                break
            expected += p
            v = expected / (a + b * (g + 1) + g * d)
            if v > best:
                best_g, best = g, v
        return best_g
