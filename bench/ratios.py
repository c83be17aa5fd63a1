"""Whole-run throughput and its ratio to a reference system of the same run.

A run's tokens/s is its tokens over its seconds, summed over the prompts (how long the whole
workload takes); a system's ratio to a reference (our AR) is the ratio of the two, measured
on the same prompts, interleaved. Its 90% interval resamples the prompts (pairs kept
together, a bootstrap): a system whose interval holds 1.0 is not distinguishable from the
reference on this run's prompts and machine noise.
"""

from __future__ import annotations

import random

BOOTSTRAP = 2000  # resamples
LEVEL = 0.90  # the interval's coverage


def run_rate(rows: list[dict]) -> float:
    """Tokens per second over the whole run: sum of tokens / sum of seconds."""
    return sum(r["tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-12)


def predicted_run_rate(rows: list[dict]) -> float | None:
    """The whole run's tokens/s as predicted prompt by prompt (``predicted_tokens_per_s``):
    each prompt's tokens at its predicted rate; ``None`` unless every prompt has one."""
    if not rows or any("predicted_tokens_per_s" not in r for r in rows):
        return None
    seconds = sum(r["tokens"] / r["predicted_tokens_per_s"] for r in rows)
    return sum(r["tokens"] for r in rows) / max(seconds, 1e-12)


def paired_ratio(rows: list[dict], ref: list[dict], seed: int = 0
                 ) -> tuple[float, float, float]:
    """``(ratio, low, high)``: :func:`run_rate` of ``rows`` over that of ``ref`` (the same
    prompts, in the same order) and its :data:`LEVEL` bootstrap interval over the prompts."""
    if len(rows) != len(ref) or not rows:
        raise ValueError(f"paired_ratio: {len(rows)} runs against {len(ref)} of the reference")
    ratio = run_rate(rows) / run_rate(ref)
    rng = random.Random(seed)
    n = len(rows)
    samples = []
    for _ in range(BOOTSTRAP):
        pick = [rng.randrange(n) for _ in range(n)]
        samples.append(run_rate([rows[i] for i in pick]) / run_rate([ref[i] for i in pick]))
    samples.sort()
    tail = (1 - LEVEL) / 2
    return ratio, samples[round(tail * BOOTSTRAP)], samples[round((1 - tail) * BOOTSTRAP) - 1]
