"""The analytical model for a generation that ran under the regime bandit.

With the bandit on (``decoding/regime.py``) a PipeSpec generation is not one pipeline: the
target switches between the whole hierarchy (``full``), the n-gram drafter straight under it
(``lean``) and decoding alone (``alone``), epoch by epoch. ``analysis.predict_pipeline``
models one steady pipeline, so this module predicts each regime's rate from the figures
measured *in that regime* (the target's acceptance, windows and forward latencies differ
between them: other drafts, other threads beside it) and combines them by the tokens each
regime committed: the time a regime takes is its tokens over its predicted rate.

Pure Python, like ``analysis``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipespec_fast.analysis import Prediction, StageProfile, predict_from_stats

__all__ = ["RegimePrediction", "predict_regimes"]


@dataclass(frozen=True)
class RegimePrediction:
    """Predicted tokens/s per regime, the tokens each committed, and their combination."""

    rates: dict[str, float]  # regime -> predicted tokens/s while it runs
    tokens: dict[str, float]  # regime -> tokens the target committed in it
    tokens_per_s: float  # all tokens over the sum of each regime's tokens / rate
    pipelines: dict[str, Prediction]  # the pipeline prediction of each regime with drafts

    def end_to_end_tokens_per_s(self, tokens: int, prefill_s: float) -> float:
        """A whole generation: the measured prefill plus ``tokens`` at the combined rate."""
        if tokens <= 0 or prefill_s < 0:
            raise ValueError(f"tokens must be > 0 and prefill_s >= 0, got {tokens}, {prefill_s}")
        return tokens / (prefill_s + tokens / self.tokens_per_s)

    def to_dict(self) -> dict[str, Any]:
        return {"rates": dict(self.rates), "tokens": dict(self.tokens),
                "tokens_per_s": self.tokens_per_s,
                "pipelines": {a: p.to_dict() for a, p in self.pipelines.items()}}


def predict_regimes(inputs: Mapping[str, tuple[Mapping[str, Any], float]],
                    **options: Any) -> RegimePrediction:
    """``inputs``: regime -> (``predict_from_stats`` input of the stages it runs, tokens it
    committed). A regime of one stage (the target alone) runs at ``1 / L(1)``; any other at
    ``predict_from_stats``' PipeSpec rate (``options`` go to it). Regimes that committed no
    tokens are predicted but do not weigh."""
    if not inputs:
        raise ValueError("predict_regimes: no regime ran (inputs is empty)")
    rates: dict[str, float] = {}
    tokens: dict[str, float] = {}
    pipelines: dict[str, Prediction] = {}
    for arm, (stats, n) in inputs.items():
        if n < 0:
            raise ValueError(f"inputs[{arm!r}]: tokens must be >= 0, got {n}")
        stages = stats.get("stages") if isinstance(stats, Mapping) else None
        if isinstance(stages, list) and len(stages) == 1:
            alone = StageProfile.from_dict(stages[0], f"inputs[{arm!r}]['stages'][0]")
            rates[arm] = 1.0 / alone.latency_s(1)
        else:
            pipelines[arm] = predict_from_stats(stats, **options)
            rates[arm] = pipelines[arm].pipespec_tokens_per_s
        tokens[arm] = float(n)
    total = sum(tokens.values())
    if total <= 0:
        raise ValueError("predict_regimes: no regime committed a token")
    seconds = sum(tokens[a] / rates[a] for a in rates if tokens[a] > 0)
    return RegimePrediction(rates=rates, tokens=tokens, tokens_per_s=total / seconds,
                            pipelines=pipelines)
