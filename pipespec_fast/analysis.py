"""Analytical throughput model for PipeSpec (hierarchical pipelined speculative decoding).

Pure Python (``math`` only): no torch, no numpy. See ``docs/ANALYSIS.md`` for the derivation,
what each input is measured from in the engine, and where the model is expected to miss.

Conventions
-----------
A pipeline has ``k >= 2`` stages ``0 .. k-1``, smallest (the drafter) first, the target last.
For a verifying stage ``i >= 1``:

* ``alpha_i`` -- probability that one token proposed by stage ``i-1`` is accepted by stage ``i``
  (per token, i.i.d.);
* ``gamma_i`` -- verification window: draft tokens stage ``i`` checks in one verification step
  (one forward over ``gamma_i + 1`` positions).

Closed forms (``A`` is the truncated geometric sum ``1 + a + ... + a^gamma``)::

    A(a, g)   = (1 - a^(g+1)) / (1 - a)               expected tokens per verification step
    rho(a, g) = a / (1 - a^(g+1) + a)                  P(a step is a verification step)
    E[N]      = (1 - rho) + rho * A                    expected tokens per step
    S_sync    = A / (g*c + 1)                          synchronous SD speedup, c = draft/target

All of them are evaluated in forms that are exact at ``a = 0`` and ``a = 1`` and continuous in
between (no ``0/0``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "LatencyModel",
    "Prediction",
    "StagePrediction",
    "StageProfile",
    "acceptance_estimate",
    "alpha_from_mean_accepted",
    "best_window",
    "estimate_alpha",
    "expected_accepted",
    "expected_tokens_per_step",
    "predict_from_stats",
    "predict_pipeline",
    "SpeculationCeiling",
    "alpha_needed",
    "speculation_ceiling",
    "sync_sd_speedup",
    "verify_probability",
]

POLICIES = ("paper", "wait")
STEP_MODELS = ("mixed", "verify")
STARVE_POLICIES = ("fill", "idle")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _real(x: Any, name: str, index: int | None = None) -> float:
    """``x`` as a finite float, or raise (TypeError for non-numbers, ValueError otherwise).
    ``index``: ``x`` is ``name[index]`` (formatted only for the error: this runs in the
    window decision of every verify step)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        where = name if index is None else f"{name}[{index}]"
        raise TypeError(f"{where} must be a real number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        where = name if index is None else f"{name}[{index}]"
        raise ValueError(f"{where} must be finite, got {x!r}")
    return v


def _check_alpha(alpha: Any, name: str = "alpha") -> float:
    a = _real(alpha, name)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {alpha!r}")
    return a


def _check_gamma(gamma: Any, name: str = "gamma") -> float:
    g = _real(gamma, name)
    if g < 1.0:
        raise ValueError(f"{name} must be >= 1, got {gamma!r}")
    return g


def _check_int_gamma(gamma: Any, name: str = "gamma") -> int:
    g = _check_gamma(gamma, name)
    if not g.is_integer():
        raise ValueError(f"{name} must be an integer, got {gamma!r}")
    return int(g)


# --------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------


def _one_minus_pow(a: float, p: float) -> float:
    """``1 - a**p`` without cancellation for ``a`` near 1 (``0 <= a <= 1``, ``p > 0``)."""
    if a == 0.0:
        return 1.0
    if a == 1.0:
        return 0.0
    return -math.expm1(p * math.log(a))


def expected_accepted(alpha: float, gamma: float) -> float:
    """Expected tokens produced by one verification of a ``gamma``-token window.

    ``(1 - alpha^(gamma+1)) / (1 - alpha) = 1 + alpha + ... + alpha^gamma``: the accepted
    drafts (a truncated geometric count) plus the one bonus/correction token the verifier always
    emits. ``1`` at ``alpha = 0``, ``gamma + 1`` at ``alpha = 1``. ``gamma`` may be fractional
    (smooth interpolation of the closed form, e.g. for a measured mean window).
    """
    return _accepted(_check_alpha(alpha), _check_gamma(gamma))


def _accepted(a: float, g: float) -> float:
    """:func:`expected_accepted` without argument checks (a hot loop's)."""
    if a == 1.0:
        return g + 1.0
    return _one_minus_pow(a, g + 1.0) / (1.0 - a)


def verify_probability(alpha: float, gamma: float) -> float:
    """Steady-state probability ``rho`` that a step of a stage is a verification step.

    ``rho = alpha / (1 - alpha^(gamma+1) + alpha)``: the stationary probability of the
    verification state of the two-state chain {generate -> verify w.p. ``alpha``; verify ->
    generate w.p. ``1 - alpha^(gamma+1)``}. ``0`` at ``alpha = 0``, ``1`` at ``alpha = 1``.
    """
    a = _check_alpha(alpha)
    g = _check_gamma(gamma)
    return a / (_one_minus_pow(a, g + 1.0) + a) if a > 0.0 else 0.0


def expected_tokens_per_step(alpha: float, gamma: float) -> float:
    """``E[N] = (1 - rho) + rho * A``: expected tokens a stage emits per step.

    Strictly greater than 1 for ``0 < alpha <= 1`` (``gamma >= 1``), ``1`` at ``alpha = 0``,
    ``gamma + 1`` at ``alpha = 1``.
    """
    rho = verify_probability(alpha, gamma)
    return (1.0 - rho) + rho * expected_accepted(alpha, gamma)


def sync_sd_speedup(alpha: float, gamma: float, c: float) -> float:
    """Speedup of synchronous speculative decoding over target-only autoregressive decoding.

    ``(1 - alpha^(gamma+1)) / ((1 - alpha) * (gamma * c + 1))`` where ``c`` is the cost of one
    draft forward relative to one target forward, and verifying ``gamma + 1`` positions is
    assumed to cost the same as one target forward (memory-bound regime).
    """
    cc = _real(c, "c")
    if cc < 0.0:
        raise ValueError(f"c must be >= 0, got {c!r}")
    g = _check_gamma(gamma)
    return expected_accepted(alpha, g) / (g * cc + 1.0)


def alpha_from_mean_accepted(mean_accepted: float, gamma: float) -> float:
    """Invert ``expected_accepted``: the ``alpha`` whose mean accepted *drafts* per verification
    (bonus/correction token excluded, so in ``[0, gamma]``) equals ``mean_accepted``."""
    g = _check_gamma(gamma)
    m = _real(mean_accepted, "mean_accepted")
    if not 0.0 <= m <= g:
        raise ValueError(f"mean_accepted must be in [0, gamma={g:g}], got {mean_accepted!r}")
    if m == 0.0:
        return 0.0
    if m == g:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):  # monotone increasing in alpha; bisection to float resolution
        mid = 0.5 * (lo + hi)
        if expected_accepted(mid, g) - 1.0 < m:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-16:
            break
    return 0.5 * (lo + hi)


def estimate_alpha(accepted_counts: Sequence[int], gamma: int) -> float:
    """Maximum-likelihood per-token ``alpha`` from per-verification accepted-draft counts.

    Each count is the number of drafts accepted in one verification of a ``gamma`` window
    (``0 .. gamma``, bonus token excluded). Under the i.i.d. model a count below ``gamma`` is
    ``count`` successes then one failure; a count equal to ``gamma`` is censored (no failure
    observed). The MLE is ``sum(counts) / (sum(counts) + #{count < gamma})``. Note that the
    naive ``accepted / proposed`` is biased low (drafts after the first rejection are never
    tested). Returns 1.0 when no rejection was observed.
    """
    g = _check_int_gamma(gamma)
    total = 0
    failures = 0
    n = 0
    for j, c in enumerate(accepted_counts):
        cv = _real(c, "accepted_counts", j)
        if not cv.is_integer() or not 0 <= cv <= g:
            raise ValueError(f"accepted_counts[{j}] must be an integer in [0, {g}], got {c!r}")
        total += int(cv)
        failures += int(cv) < g
        n += 1
    if n == 0:
        raise ValueError("accepted_counts must not be empty")
    if failures == 0:
        return 1.0
    return acceptance_estimate(total, failures)


def acceptance_estimate(accepted: float, rejections: float, prior: float = 0.0) -> float:
    """Per-token ``alpha`` from ``accepted`` drafts and the number of verification steps that
    ended in a ``rejections`` (the one estimate of the codebase: :func:`estimate_alpha`, the
    engine's ``StageStats.alpha`` and its adaptive window all use it).

    Under i.i.d. acceptance a step is its accepted drafts then one failure, or is censored when
    every draft was accepted, so the maximum-likelihood estimate is
    ``accepted / (accepted + rejections)``. ``prior`` adds that many pseudo-acceptances and
    pseudo-rejections (``1``: Laplace's rule, ``1/2`` before anything was seen), which keeps a
    decaying estimate away from 0 and 1 after a few steps. ``0`` when nothing was seen.
    Not validated (it runs once per verification step in the engine): counts are ``>= 0``.
    """
    seen = accepted + rejections + 2 * prior
    return (accepted + prior) / seen if seen else 0.0


# --------------------------------------------------------------------------------------------
# latency models
# --------------------------------------------------------------------------------------------


def _check_points(ns: Sequence[float], seconds: Sequence[float]) -> list[tuple[float, float]]:
    ns = list(ns)
    seconds = list(seconds)
    if len(ns) != len(seconds):
        raise ValueError(f"ns and seconds must have the same length ({len(ns)} != {len(seconds)})")
    if not ns:
        raise ValueError("ns must not be empty")
    pts = []
    for j, (n, s) in enumerate(zip(ns, seconds, strict=True)):
        nv = _real(n, "ns", j)
        sv = _real(s, "seconds", j)
        if nv < 1.0:
            raise ValueError(f"ns[{j}] must be >= 1 (tokens per forward), got {n!r}")
        if sv <= 0.0:
            raise ValueError(f"seconds[{j}] must be positive (latency), got {s!r}")
        pts.append((nv, sv))
    return pts


def weighted_line(ns: Sequence[float], seconds: Sequence[float], weights: Sequence[float]
                  ) -> tuple[float, float]:
    """``(a, b)`` of the weighted least-squares line ``a + b n`` with ``b >= 0`` (a negative
    slope gives the weighted mean as a constant); ``a`` may come out negative. The one fit of
    the codebase: :meth:`LatencyModel.fit` adds the ``a >= 0`` boundary to it, and the
    engine's adaptive window calls it directly on every verification step, so nothing is
    checked here (``weights`` positive, at least one point)."""
    sw = math.fsum(weights)
    n_mean = math.fsum(w * n for w, n in zip(weights, ns, strict=True)) / sw
    s_mean = math.fsum(w * s for w, s in zip(weights, seconds, strict=True)) / sw
    sxx = math.fsum(w * (n - n_mean) ** 2 for w, n in zip(weights, ns, strict=True))
    if sxx == 0.0:
        return s_mean, 0.0
    sxy = math.fsum(w * (n - n_mean) * (s - s_mean)
                    for w, n, s in zip(weights, ns, seconds, strict=True))
    b = sxy / sxx
    if b < 0.0:  # boundary b = 0: best constant
        return s_mean, 0.0
    return s_mean - b * n_mean, b


def _check_weights(weights: Sequence[float], m: int) -> list[float]:
    w = list(weights)
    if len(w) != m:
        raise ValueError(f"weights: expected {m} entries (one per point), got {len(w)}")
    if not all(type(x) is float and 0.0 < x < math.inf for x in w):  # the engine's, fast
        w = [_real(x, "weights", j) for j, x in enumerate(w)]
        if any(x <= 0.0 for x in w):
            raise ValueError(f"weights must be positive, got {list(weights)!r}")
    return w


@dataclass(frozen=True)
class LatencyModel:
    """Latency in seconds of one forward of a stage over ``n`` token positions.

    Either linear ``a + b * n`` (``points`` empty) or a piecewise-linear table (``points``).
    Build with :meth:`fit`, :meth:`table`, :meth:`linear` or :meth:`constant`.
    """

    a: float = 0.0
    b: float = 0.0
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.points:
            pts = _check_points([n for n, _ in self.points], [s for _, s in self.points])
            if any(n1 <= n0 for (n0, _), (n1, _) in zip(pts, pts[1:], strict=False)):
                raise ValueError("points must be sorted by strictly increasing n")
            object.__setattr__(self, "points", tuple(pts))
        else:
            a = _real(self.a, "a")
            b = _real(self.b, "b")
            if a < 0.0:
                raise ValueError(f"a must be >= 0 (latency intercept), got {self.a!r}")
            if b < 0.0:
                raise ValueError(f"b must be >= 0 (latency per token), got {self.b!r}")
            if a + b <= 0.0:
                raise ValueError("latency model must be positive at n=1 (a + b > 0)")

    # constructors --------------------------------------------------------------------------

    @classmethod
    def linear(cls, a: float, b: float) -> LatencyModel:
        """``latency(n) = a + b * n`` seconds."""
        return cls(a=_real(a, "a"), b=_real(b, "b"))

    @classmethod
    def constant(cls, seconds: float) -> LatencyModel:
        """Same latency for any ``n`` (memory-bound forward)."""
        s = _real(seconds, "seconds")
        if s <= 0.0:
            raise ValueError(f"seconds must be positive (latency), got {seconds!r}")
        return cls(a=s, b=0.0)

    @classmethod
    def fit(cls, ns: Sequence[float], seconds: Sequence[float],
            weights: Sequence[float] | None = None) -> LatencyModel:
        """Least-squares fit of ``a + b * n`` to measured ``(n, seconds)`` pairs.

        Constrained to ``a >= 0`` and ``b >= 0`` (a latency cannot shrink with more tokens or
        be negative): when the unconstrained optimum violates one, the optimum on that
        boundary is returned. A single distinct ``n`` gives a constant model. ``weights``
        (positive, one per pair; default all 1) weigh each pair's squared error: the engine's
        adaptive window passes each block size's decayed mean latency with its decayed count.
        """
        pts = _check_points(ns, seconds)
        ws = [1.0] * len(pts) if weights is None else _check_weights(weights, len(pts))
        a, b = weighted_line([n for n, _ in pts], [s for _, s in pts], ws)
        if a < 0.0:  # boundary a = 0: regression through the origin
            wns = [(w, n, s) for w, (n, s) in zip(ws, pts, strict=True)]
            a = 0.0
            b = math.fsum(w * n * s for w, n, s in wns) / math.fsum(w * n * n for w, n, _ in wns)
        return cls(a=a, b=b)

    @classmethod
    def table(cls, ns: Sequence[float], seconds: Sequence[float]) -> LatencyModel:
        """Piecewise-linear interpolation of measured points (duplicate ``n`` are averaged).

        Below the smallest measured ``n`` the first value is used; above the largest, the last
        segment's slope (clamped at >= 0) extrapolates.
        """
        pts = _check_points(ns, seconds)
        groups: dict[float, list[float]] = {}
        for n, s in pts:
            groups.setdefault(n, []).append(s)
        merged = tuple((n, math.fsum(v) / len(v)) for n, v in sorted(groups.items()))
        return cls(points=merged)

    @classmethod
    def from_dict(cls, d: Any, name: str = "latency") -> LatencyModel:
        """From ``{"n": [...], "s": [...], "kind": "fit"|"table"}``, ``{"a": .., "b": ..}``,
        or a bare number of seconds (constant)."""
        if isinstance(d, numbers.Real) and not isinstance(d, bool):
            return cls.constant(d)
        if not isinstance(d, Mapping):
            raise ValueError(f"{name} must be a number or a mapping, got {type(d).__name__}")
        if "n" in d or "s" in d:
            if "n" not in d or "s" not in d:
                raise ValueError(f"{name} needs both 'n' and 's'")
            kind = d.get("kind", "fit")
            try:
                if kind == "fit":
                    return cls.fit(d["n"], d["s"])
                if kind == "table":
                    return cls.table(d["n"], d["s"])
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            raise ValueError(f"{name}['kind'] must be 'fit' or 'table', got {kind!r}")
        if "a" in d:
            try:
                return cls.linear(d["a"], d.get("b", 0.0))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        raise ValueError(f"{name} must have 'n' and 's', or 'a' (and 'b')")

    def to_dict(self) -> dict[str, Any]:
        if self.points:
            return {
                "kind": "table",
                "n": [n for n, _ in self.points],
                "s": [s for _, s in self.points],
            }
        return {"a": self.a, "b": self.b}

    # evaluation ----------------------------------------------------------------------------

    def latency_s(self, n_tokens: float) -> float:
        """Seconds for one forward over ``n_tokens`` positions (``n_tokens >= 1``)."""
        n = _real(n_tokens, "n_tokens")
        if n < 1.0:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
        if not self.points:
            return self.a + self.b * n
        return _interpolate(self.points, n)

    __call__ = latency_s


def _interpolate(pts: tuple[tuple[float, float], ...], n: float) -> float:
    """A table's latency at ``n``: the first value below the table, linear between points, the
    last segment's slope (clamped at >= 0) above it."""
    if n <= pts[0][0]:
        return pts[0][1]
    if n >= pts[-1][0]:
        n1, s1 = pts[-1]
        if len(pts) == 1:
            return s1
        n0, s0 = pts[-2]
        slope = max(0.0, (s1 - s0) / (n1 - n0))
        return s1 + slope * (n - n1)
    lo, hi = 0, len(pts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pts[mid][0] <= n:
            lo = mid
        else:
            hi = mid
    (n0, s0), (n1, s1) = pts[lo], pts[hi]
    return s0 + (s1 - s0) * (n - n0) / (n1 - n0)


# --------------------------------------------------------------------------------------------
# pipeline prediction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageProfile:
    """One pipeline stage.

    ``alpha``: acceptance rate of the previous stage's tokens at this stage (ignored, may be
    ``None``, for stage 0). ``gamma``: verification window of this stage (ignored for stage 0).

    A stage that verifies token *trees* is not described by the chain's closed form: its
    siblings raise the accepted length above ``A(alpha, gamma)`` and its forward covers the
    tree's nodes, not ``gamma + 1`` positions. ``accepted_per_verify`` (tokens committed per
    verification, the verifier's own included) and ``verify_tokens`` (positions per verify
    forward) then replace ``A`` and ``gamma + 1``; ``alpha`` and ``gamma`` still give the
    share of verification steps and the chance that a window breaks.

    ``verify_share``: the share of this stage's steps that verified drafts, measured. The
    paper's two-state chain derives it from ``alpha`` and ``gamma`` (``verify_probability``):
    after a broken window the drafts in flight are void and the stage decodes alone until
    new ones arrive. A stage whose drafts come from an inline drafter (the n-gram's, which
    proposes again at once) or from a drafter that runs ahead has drafts at most steps; the
    measured share replaces the chain's, and since it already counts the steps a stage
    decoded alone for want of drafts, the supply limit is not applied again.

    ``step_overhead_s``: host time a step of this stage spends outside its forward (the
    engine's bookkeeping, messages, the caller's tokens), added to every step's latency.
    """

    name: str
    latency: LatencyModel
    alpha: float | None = None
    gamma: int = 1
    accepted_per_verify: float | None = None
    verify_tokens: float | None = None
    verify_share: float | None = None
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.latency, LatencyModel):
            raise TypeError(f"latency must be a LatencyModel, got {type(self.latency).__name__}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _check_alpha(self.alpha, "alpha"))
        object.__setattr__(self, "gamma", _check_int_gamma(self.gamma, "gamma"))
        for key in ("accepted_per_verify", "verify_tokens"):
            v = getattr(self, key)
            if v is not None:
                object.__setattr__(self, key, _check_gamma(v, key))  # a real >= 1
        if self.verify_share is not None:  # a share in [0, 1], as alpha is
            object.__setattr__(self, "verify_share", _check_alpha(self.verify_share,
                                                                  "verify_share"))
        o = _real(self.step_overhead_s, "step_overhead_s")
        if o < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s!r}")
        object.__setattr__(self, "step_overhead_s", o)

    @property
    def verify_n(self) -> float:
        """Positions of one verify forward: ``verify_tokens``, else ``gamma + 1``."""
        return self.gamma + 1.0 if self.verify_tokens is None else self.verify_tokens

    def accepted(self) -> float:
        """Tokens committed per verification: measured (``accepted_per_verify``), else
        ``A(alpha, gamma)``."""
        if self.accepted_per_verify is not None:
            return self.accepted_per_verify
        return expected_accepted(float(self.alpha or 0.0), self.gamma)

    def latency_s(self, n_tokens: float) -> float:
        """One step over ``n_tokens`` positions: the forward plus ``step_overhead_s``."""
        return self.latency.latency_s(n_tokens) + self.step_overhead_s

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], name: str = "stage", default_name: str = "stage"
    ) -> StageProfile:
        """From ``{"name", "alpha", "gamma", "latency"}`` (see :func:`predict_from_stats`);
        ``name`` is used in error messages."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{name} must be a mapping, got {type(d).__name__}")
        if "latency" not in d:
            raise ValueError(f"{name}['latency'] is required")
        lat = LatencyModel.from_dict(d["latency"], f"{name}['latency']")
        try:
            alpha = d.get("alpha")
            alpha = None if alpha is None else _check_alpha(alpha, f"{name}['alpha']")
            gamma = _check_int_gamma(d.get("gamma", 1), f"{name}['gamma']")
            extra = {k: _check_gamma(d[k], f"{name}[{k!r}]")
                     for k in ("accepted_per_verify", "verify_tokens") if d.get(k) is not None}
            if d.get("verify_share") is not None:
                extra["verify_share"] = _check_alpha(d["verify_share"], f"{name}['verify_share']")
            if d.get("step_overhead_s"):
                extra["step_overhead_s"] = _real(d["step_overhead_s"], f"{name}['step_overhead_s']")
        except TypeError as e:
            raise ValueError(str(e)) from None
        return cls(name=str(d.get("name", default_name)), latency=lat, alpha=alpha, gamma=gamma,
                   **extra)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "latency": self.latency.to_dict(),
        }
        for k in ("accepted_per_verify", "verify_tokens", "verify_share"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.step_overhead_s:
            d["step_overhead_s"] = self.step_overhead_s
        return d


@dataclass(frozen=True)
class StagePrediction:
    """Per-stage steady state. Rates are in this stage's output tokens per second."""

    name: str
    alpha: float | None
    gamma: int
    rho: float  # P(step is a verification): 0 for the drafter, 1 under policy="wait"
    expected_accepted: float  # A: tokens per verification step (incl. bonus/correction)
    expected_tokens_per_step: float  # E[N]
    step_time_s: float  # mean step time when not starved (policy="wait": L(gamma+1))
    capacity_tokens_per_s: float  # E[N] / step_time_s
    tokens_per_s: float  # realised rate after the supply limit
    verify_steps_per_s: float
    draft_demand_per_s: float  # drafts/s this stage would consume at capacity
    draft_supply_per_s: float  # drafts/s the stage below delivers (0 for the drafter)
    starved: bool


@dataclass(frozen=True)
class Prediction:
    """Predicted target-output throughput for PipeSpec, AR, and synchronous SD."""

    stages: tuple[StagePrediction, ...]
    pipespec_tokens_per_s: float
    ar_tokens_per_s: float
    sync_sd_tokens_per_s: float
    pipespec_speedup: float  # vs target-only autoregressive decoding
    sync_sd_speedup: float  # vs target-only autoregressive decoding
    pipespec_vs_sync_sd: float
    alpha_end_to_end: float  # P(a stage-0 draft token survives every stage), i.i.d. product
    bottleneck: str  # stage whose own compute limits the target's rate
    policy: str
    step_model: str
    on_starve: str
    notes: tuple[str, ...] = field(default=())

    def end_to_end_tokens_per_s(self, tokens: int, prefill_s: float) -> float:
        """Throughput of one whole generation: the prompt's prefill (measured: the model is
        about the steady state after it) plus ``tokens`` at the predicted PipeSpec rate."""
        tokens, prefill_s = _real(tokens, "tokens"), _real(prefill_s, "prefill_s")
        if tokens <= 0 or prefill_s < 0:
            raise ValueError(f"tokens must be > 0 and prefill_s >= 0, got {tokens}, {prefill_s}")
        return tokens / (prefill_s + tokens / self.pipespec_tokens_per_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        d["notes"] = list(self.notes)
        return d

    def summary(self) -> str:
        lines = [
            f"{'stage':<16}{'alpha':>7}{'gamma':>6}{'rho':>7}{'E[N]':>7}"
            f"{'step ms':>9}{'cap tok/s':>11}{'tok/s':>9}  starved"
        ]
        for s in self.stages:
            alpha = "-" if s.alpha is None else f"{s.alpha:.3f}"
            lines.append(
                f"{s.name[:15]:<16}{alpha:>7}{s.gamma:>6}{s.rho:>7.3f}"
                f"{s.expected_tokens_per_step:>7.3f}{s.step_time_s * 1e3:>9.3f}"
                f"{s.capacity_tokens_per_s:>11.2f}{s.tokens_per_s:>9.2f}  {s.starved}"
            )
        lines.append(
            f"AR {self.ar_tokens_per_s:.2f} tok/s | sync SD {self.sync_sd_tokens_per_s:.2f} "
            f"tok/s ({self.sync_sd_speedup:.2f}x) | PipeSpec {self.pipespec_tokens_per_s:.2f} "
            f"tok/s ({self.pipespec_speedup:.2f}x, policy {self.policy}), "
            f"bottleneck {self.bottleneck}"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _paper_stage(
    a: float, g: int, big_a: float, l1: float, lv: float, supply: float, on_starve: str
) -> tuple[float, float, float, float, float, float, float, bool]:
    """Never-wait policy (the paper's chain), ``big_a`` tokens per verification. Returns
    (rho, E[N], step time, capacity, rate, verify/s, demand drafts/s, starved)."""
    rho = verify_probability(a, g)
    en = (1.0 - rho) + rho * big_a
    t = (1.0 - rho) * l1 + rho * lv
    cap = en / t
    v_cap = rho / t
    p_break = _one_minus_pow(a, g + 1.0)
    v_sup = supply / (g + p_break * supply * lv)
    starved = v_sup < v_cap
    if not starved:
        return rho, en, t, cap, cap, v_cap, v_cap * g, False
    v = v_sup
    if on_starve == "fill":
        out = v * big_a + max(0.0, 1.0 - v * lv) / l1
    else:
        out = cap * (v / v_cap)
    return rho, en, t, cap, out, v, v_cap * g, True


def _share_stage(
    rho: float, g: int, big_a: float, l1: float, lv: float
) -> tuple[float, float, float, float, float, float, float, bool]:
    """Never-wait policy with a measured share ``rho`` of verification steps
    (``StageProfile.verify_share``): the two-state chain's step mix with ``rho`` given. The
    share already counts the steps decoded alone for want of drafts, so the rate is the
    capacity at that share, never starved."""
    en = (1.0 - rho) + rho * big_a
    t = (1.0 - rho) * l1 + rho * lv
    v = rho / t
    return rho, en, t, en / t, en / t, v, v * g, False


def _wait_stage(
    a: float, g: int, big_a: float, lv: float, supply: float
) -> tuple[float, float, float, float, float, float, float, bool]:
    """Wait-for-drafts policy: every step verifies a full window (``big_a`` tokens per
    verification); after a broken window the stage waits for the stage below to refill it
    from scratch."""
    p_break = _one_minus_pow(a, g + 1.0)
    refill = g / supply
    t_cycle = lv + p_break * refill + (1.0 - p_break) * max(0.0, refill - lv)
    cap = big_a / lv
    return 1.0, big_a, lv, cap, big_a / t_cycle, 1.0 / t_cycle, g / lv, refill > lv


def predict_pipeline(
    stages: Sequence[StageProfile],
    *,
    policy: str = "paper",
    step_model: str = "mixed",
    on_starve: str = "fill",
) -> Prediction:
    """Steady-state throughput of a ``k``-stage asynchronous PipeSpec pipeline.

    Each stage runs on its own compute, concurrently. Stage 0 decodes autoregressively at
    ``R_0 = 1 / L_0(1)`` tokens/s. Stage ``i >= 1`` consumes the ``R_{i-1}`` drafts/s of the
    stage below; ``A, rho, E[N]`` come from its ``(alpha_i, gamma_i)``, ``Lv = L_i(gamma_i+1)``
    and ``p = 1 - alpha_i^(gamma_i+1)`` is the probability that drafts beyond a window are
    invalidated (a rejection inside it, or a mismatch at the bonus position).

    ``policy="paper"`` (default, the paper's never-wait model): with valid drafts a stage
    verifies, else it decodes alone: the two-state chain (``StageProfile.verify_share``).

    * mean step time ``T = (1 - rho) * L_i(1) + rho * Lv`` (``step_model="mixed"``), or
      ``Lv`` for every step (``"verify"``); capacity ``C_i = E[N] / T``, with ``rho / T``
      verifications/s each consuming ``gamma_i`` drafts;
    * drafts produced while a broken window is verified are rolled back, so the stage below
      can feed at most ``v_sup = R_{i-1} / (gamma_i + p * R_{i-1} * Lv)`` verifications/s;
    * ``v = min(rho / T, v_sup)``; the remaining time goes to one-token steps
      (``on_starve="fill"``: ``R_i = v * A + (1 - v * Lv) / L_i(1)``) or idles
      (``"idle"``: ``R_i = C_i * v / (rho / T)``).


    ``policy="wait"``: every step verifies a full window; after a broken window the stage
    waits for ``gamma_i`` fresh drafts: ``R_i = A / (Lv + p * g/R_{i-1} + (1 - p) *
    max(0, g/R_{i-1} - Lv))``.

    The PipeSpec rate is ``R_{k-1}``. AR baseline: ``1 / L_{k-1}(1)``. Synchronous SD baseline:
    the stage just below the target drafts ``gamma_{k-1}`` tokens autoregressively, then the
    target verifies them: ``A / (gamma * L_{k-2}(1) + L_{k-1}(gamma + 1))``.
    """
    stages = _checked_pipeline(stages, policy, step_model, on_starve)
    preds = [_drafter_prediction(stages[0])]
    alpha_e2e = 1.0
    for st in stages[1:]:
        preds.append(_verifier_prediction(st, preds[-1].tokens_per_s, policy, step_model,
                                          on_starve))
        alpha_e2e *= preds[-1].alpha
    rate, tp = preds[-1].tokens_per_s, preds[-1]
    ar, sync = _baselines(stages[-2], stages[-1], tp)
    return Prediction(
        stages=tuple(preds),
        pipespec_tokens_per_s=rate,
        ar_tokens_per_s=ar,
        sync_sd_tokens_per_s=sync,
        pipespec_speedup=rate / ar,
        sync_sd_speedup=sync / ar,
        pipespec_vs_sync_sd=rate / sync,
        alpha_end_to_end=alpha_e2e,
        bottleneck=_bottleneck(preds),
        policy=policy,
        step_model=step_model,
        on_starve=on_starve,
        notes=_notes(tp, rate, ar),
    )


def _checked_pipeline(stages: Sequence[StageProfile], policy: str, step_model: str,
                      on_starve: str) -> list[StageProfile]:
    """The stages as a list, after checking the options and that every verifier has an alpha."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if step_model not in STEP_MODELS:
        raise ValueError(f"step_model must be one of {STEP_MODELS}, got {step_model!r}")
    if on_starve not in STARVE_POLICIES:
        raise ValueError(f"on_starve must be one of {STARVE_POLICIES}, got {on_starve!r}")
    stages = list(stages)
    if len(stages) < 2:
        raise ValueError(f"stages must hold at least 2 stages (drafter, target), got {len(stages)}")
    for i, st in enumerate(stages):
        if not isinstance(st, StageProfile):
            raise TypeError(f"stages[{i}] must be a StageProfile, got {type(st).__name__}")
        if i >= 1 and st.alpha is None:
            raise ValueError(f"stages[{i}].alpha is required (acceptance vs stage {i - 1})")
    return stages


def _drafter_prediction(d0: StageProfile) -> StagePrediction:
    """Stage 0 decodes alone, one token per step: ``R_0 = 1 / L_0(1)``."""
    l0 = d0.latency_s(1)
    rate = 1.0 / l0
    return StagePrediction(
        name=d0.name,
        alpha=d0.alpha,
        gamma=d0.gamma,
        rho=0.0,
        expected_accepted=1.0,
        expected_tokens_per_step=1.0,
        step_time_s=l0,
        capacity_tokens_per_s=rate,
        tokens_per_s=rate,
        verify_steps_per_s=0.0,
        draft_demand_per_s=0.0,
        draft_supply_per_s=0.0,
        starved=False,
    )


def _verifier_prediction(st: StageProfile, supply: float, policy: str, step_model: str,
                         on_starve: str) -> StagePrediction:
    """A stage ``i >= 1`` fed ``supply`` drafts/s by the stage below (``predict_pipeline``)."""
    a = float(st.alpha)  # validated by _checked_pipeline
    g = st.gamma
    big_a = st.accepted()
    lv = st.latency_s(st.verify_n)
    if policy == "paper" and st.verify_share is not None:
        l1 = st.latency_s(1) if step_model == "mixed" else lv
        res = _share_stage(st.verify_share, g, big_a, l1, lv)
    elif policy == "paper":
        l1 = st.latency_s(1) if step_model == "mixed" else lv
        res = _paper_stage(a, g, big_a, l1, lv, supply, on_starve)
    else:
        res = _wait_stage(a, g, big_a, lv, supply)
    rho, en, t, cap, out, v, demand, starved = res
    return StagePrediction(
        name=st.name,
        alpha=a,
        gamma=g,
        rho=rho,
        expected_accepted=big_a,
        expected_tokens_per_step=en,
        step_time_s=t,
        capacity_tokens_per_s=cap,
        tokens_per_s=out,
        verify_steps_per_s=v,
        draft_demand_per_s=demand,
        draft_supply_per_s=supply,
        starved=starved,
    )


def _baselines(below: StageProfile, target: StageProfile, tp: StagePrediction,
               ) -> tuple[float, float]:
    """Target-only AR tokens/s, and synchronous SD's: the stage just below drafts the target's
    window autoregressively, then the target verifies it."""
    ar = 1.0 / target.latency_s(1)
    t_sync = tp.gamma * below.latency_s(1) + target.latency_s(target.verify_n)
    return ar, tp.expected_accepted / t_sync


def _bottleneck(preds: list[StagePrediction]) -> str:
    """The highest stage that is not starved: its own compute limits the target's rate."""
    for p in reversed(preds):
        if not p.starved:
            return p.name
    return preds[0].name


def _notes(tp: StagePrediction, rate: float, ar: float) -> tuple[str, ...]:
    """Warnings worth printing beside a prediction: a starved target, PipeSpec below AR."""
    notes: list[str] = []
    if tp.starved:
        notes.append(
            f"target is starved: the stages below deliver {tp.draft_supply_per_s:.1f} drafts/s, "
            f"it could verify {tp.draft_demand_per_s:.1f}/s"
        )
    if rate < ar:
        notes.append(
            "PipeSpec predicted slower than AR: verification cost grows faster with the window "
            "than accepted tokens (A < L(gamma+1)/L(1)) or the target is starved"
        )
    return tuple(notes)


_OPTION_KEYS = ("policy", "step_model", "on_starve")


@dataclass(frozen=True)
class SpeculationCeiling:
    """The best a verifier can do with drafts of per-token acceptance ``alpha`` (target
    tokens/s), from its measured latency ``L(n)``: what no schedule of the same drafts beats."""

    alpha: float
    ar_tokens_per_s: float  # 1 / L(1)
    sync_tokens_per_s: float  # max over g of A(alpha, g) / (L(g+1) + cost of g drafts); g = 0: AR
    sync_gamma: int
    free_draft_tokens_per_s: float  # max over g of A(alpha, g) / L(g+1): drafts free and ready
    free_draft_gamma: int

    @property
    def free_draft_vs_sync(self) -> float:
        """Upper bound of any pipelined schedule's speedup over the best synchronous one."""
        return self.free_draft_tokens_per_s / self.sync_tokens_per_s

    @property
    def free_draft_vs_ar(self) -> float:
        return self.free_draft_tokens_per_s / self.ar_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["free_draft_vs_sync"] = self.free_draft_vs_sync
        d["free_draft_vs_ar"] = self.free_draft_vs_ar
        return d


def speculation_ceiling(
    target: LatencyModel, alpha: float, draft_s: float | Sequence[float], max_gamma: int = 16
) -> SpeculationCeiling:
    """Upper bounds on speculative decoding for one target (see ``docs/ANALYSIS.md``).

    A verification of ``g`` drafts costs ``L(g+1)`` and commits ``A(alpha, g)`` tokens on
    average. Synchronous decoding also pays for drafting them first: ``g * draft_s``, or, where
    ``draft_s`` is a sequence, the sum of its first ``g`` entries (the cost of the ``i``-th draft
    step after a verification: the first one after the target's forward reads the draft's
    weights back from memory; its last entry repeats). Its best window (``g = 0``: decode
    alone) gives ``sync_tokens_per_s``. A pipeline can at most hide the drafting entirely:
    ``A / L(g+1)`` at its best ``g`` bounds every PipeSpec schedule whose drafts come from the
    same stage below (it keeps the target busy verifying, never waiting, with drafts that cost
    it nothing). Where ``L(n)`` grows with ``n`` (a verify bound by arithmetic, not by reading
    weights), this bound is close to AR whatever the pipeline does.
    """
    a = _check_alpha(alpha)
    costs = _draft_costs(draft_s)
    gmax = _check_int_gamma(max_gamma, "max_gamma")
    if len(costs) == 1:
        sync_g, sync_rate = best_window(target, a, costs[0], gmax)
    else:
        sync_g, sync_rate = _best_window_steps(target, a, costs, gmax)
    free_g, free_rate = best_window(target, a, 0.0, gmax)
    return SpeculationCeiling(a, 1.0 / target.latency_s(1), sync_rate, sync_g, free_rate,
                              free_g)


def alpha_needed(target: LatencyModel, speedup: float, draft_s: float | Sequence[float] = 0.0,
                 max_gamma: int = 16) -> float | None:
    """The least per-token acceptance at which :func:`speculation_ceiling`'s synchronous bound
    reaches ``speedup`` times AR (``1 / L(1)``) with drafts costing ``draft_s`` (``0``: free,
    ready drafts, the bound of every pipeline); ``None`` where even ``alpha = 1`` cannot. The
    bound grows with ``alpha``, so a bisection finds it (to ``1e-6``)."""
    s = _real(speedup, "speedup")
    if s <= 0.0:
        raise ValueError(f"speedup must be > 0, got {speedup!r}")
    costs = _draft_costs(draft_s)
    gmax = _check_int_gamma(max_gamma, "max_gamma")

    def reaches(a: float) -> bool:
        c = speculation_ceiling(target, a, costs, gmax)
        return c.sync_tokens_per_s >= s * c.ar_tokens_per_s

    if not reaches(1.0):
        return None
    if reaches(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def _draft_costs(draft_s: Any) -> tuple[float, ...]:
    """``draft_s`` as per-step costs: one number (every step alike) or a non-empty sequence."""
    if isinstance(draft_s, Sequence) and not isinstance(draft_s, str):
        if not draft_s:
            raise ValueError("draft_s: an empty sequence")
        costs = tuple(_real(x, "draft_s", i) for i, x in enumerate(draft_s))
    else:
        costs = (_real(draft_s, "draft_s"),)
    if min(costs) < 0.0:
        raise ValueError(f"draft_s must be >= 0, got {draft_s!r}")
    return costs


def _best_window_steps(target: LatencyModel, alpha: float, costs: tuple[float, ...],
                       max_gamma: int) -> tuple[int, float]:
    """:func:`best_window` with the ``i``-th draft step costing ``costs[i]`` (the last repeats)."""
    best, best_rate = 0, 1.0 / target.latency_s(1)
    drafting = 0.0
    for g in range(1, max_gamma + 1):
        drafting += costs[min(g, len(costs)) - 1]
        rate = _accepted(alpha, g) / (target.latency_s(g + 1) + drafting)
        if rate > best_rate:
            best, best_rate = g, rate
    return best, best_rate


def best_window(target: LatencyModel, alpha: float, draft_s: float, max_gamma: int
                ) -> tuple[int, float]:
    """``(g, tokens/s)``: the window ``g`` in ``[0, max_gamma]`` that maximises a verifier's
    expected committed tokens per second, ``A(alpha, g) / (L(g+1) + g * draft_s)``, and that
    rate (``g = 0``: decode one token alone, ``1 / L(1)``; ties go to the smaller ``g``).

    :func:`speculation_ceiling` reports it; the engine's adaptive window
    (``pipespec_fast.decoding.window``) picks its window with it on every verification step,
    so the arguments are not validated here (``0 <= alpha <= 1``, ``draft_s >= 0``).
    """
    if not target.points:
        return best_window_linear(target.a, target.b, alpha, draft_s, max_gamma)
    best, best_rate = 0, 1.0 / target.latency_s(1)
    for g in range(1, max_gamma + 1):
        rate = _accepted(alpha, g) / (target.latency_s(g + 1) + g * draft_s)
        if rate > best_rate:
            best, best_rate = g, rate
    return best, best_rate


def best_window_linear(a: float, b: float, alpha: float, draft_s: float, max_gamma: int
                       ) -> tuple[int, float]:
    """:func:`best_window` for ``L(n) = a + b n`` (``a + b > 0``), with ``A(alpha, g)`` summed
    as it grows: what the engine's window evaluates per verification step, in a few
    microseconds."""
    best, best_rate = 0, 1.0 / (a + b)
    expected, power = 1.0, 1.0
    for g in range(1, max_gamma + 1):
        power *= alpha
        expected += power  # 1 + alpha + ... + alpha^g
        rate = expected / (a + b * (g + 1) + g * draft_s)
        if rate > best_rate:
            best, best_rate = g, rate
    return best, best_rate


def predict_from_stats(stats: Mapping[str, Any], **kwargs: Any) -> Prediction:
    """:func:`predict_pipeline` from plain measured numbers.

    ``stats = {"stages": [{"name": "draft", "latency": {"n": [1, 5], "s": [.002, .0025]}},
    {"name": "target", "alpha": 0.7, "gamma": 4, "latency": {...}}]}``, optionally with
    ``"policy"``, ``"step_model"``, ``"on_starve"`` keys. ``latency`` is ``{"n", "s"[, "kind":
    "fit"|"table"]}``, ``{"a", "b"}`` or a number of seconds. Keyword arguments override the
    option keys. Other keys (e.g. measured throughput) are ignored.
    """
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a mapping, got {type(stats).__name__}")
    raw = stats.get("stages")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ValueError("stats['stages'] must be a list of stage mappings")
    profiles = [
        StageProfile.from_dict(s, f"stats['stages'][{i}]", f"stage{i}") for i, s in enumerate(raw)
    ]
    for i, p in enumerate(profiles):
        if i >= 1 and p.alpha is None:
            raise ValueError(f"stats['stages'][{i}]['alpha'] is required")
    opts = {k: stats[k] for k in _OPTION_KEYS if k in stats}
    opts.update(kwargs)
    return predict_pipeline(profiles, **opts)
