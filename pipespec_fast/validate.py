"""One validation layer for every public entry (``FastPipeline`` and the CLI).

Each check raises ``ValueError`` with one line that names the argument and says what was
expected. The checks need no model, so the CLI runs them before it loads anything. Booleans
are refused where a number is expected (``True`` is an ``int`` in Python, and ``top_k=True``
is a mistake, not "1").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

MODES = ("pipespec", "sync", "ar")
# How products on packed Q4_1 / Q8_0 weights are computed (models.packed.set_compute): "exact",
# the converted checkpoint's fp32 arithmetic (greedy equals transformers), or "int8", the input
# rows quantised per 32-value block to int8 (pipespec_fast.cpu.int8; greedy speculative decoding
# equals the same mode's greedy AR, not transformers).
COMPUTE_MODES = ("exact", "int8")
# Below this a temperature is not a sampling temperature: logits / T overflows to inf (1e-45
# is subnormal) and every row turns to NaN. Use 0 for greedy decoding.
MIN_TEMPERATURE = 1e-6
SEED_LIMIT = 2**31  # the counter-based generator takes a 31-bit key: larger seeds would alias


def is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def temperature(t) -> float:
    if not is_real(t) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {t!r}")
    return float(t)


def top_k(k) -> int | None:
    if k is not None and (not is_int(k) or k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {k!r}")
    return None if k is None else int(k)


def top_p(p) -> float | None:
    if p is not None and (not is_real(p) or not 0.0 < p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")
    return None if p is None else float(p)


def seed(s) -> int | None:
    if s is not None and (not is_int(s) or not 0 <= s < SEED_LIMIT):
        raise ValueError(f"seed must be an integer in [0, 2**31) or None, got {s!r}")
    return None if s is None else int(s)


def max_new_tokens(n) -> int:
    if not is_int(n) or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
    return int(n)


def mode(m) -> str:
    if m not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    return m


def compute(c) -> str:
    """A compute mode (:data:`COMPUTE_MODES`), else a one-line ``ValueError``."""
    if c not in COMPUTE_MODES:
        raise ValueError(f"compute: expected one of {', '.join(COMPUTE_MODES)}, got {c!r}")
    return c


# Most nodes of a draft tree: within the acceptance kernels' 64 (reference.MAX_TREE_NODES)
# with slack, like FastPipeline's largest window.
MAX_TREE_BUDGET = 48


def tree_budget(b) -> int:
    """Nodes of the lowest drafter's token trees: 0 (chains) to :data:`MAX_TREE_BUDGET`."""
    if not is_int(b) or not 0 <= b <= MAX_TREE_BUDGET:
        raise ValueError(f"tree_budget must be an integer in [0, {MAX_TREE_BUDGET}] (0: chains), "
                         f"got {b!r}")
    return int(b)


def stop(s) -> list[str] | None:
    if s is None:
        return None
    stops = [s] if isinstance(s, str) else s
    if not isinstance(stops, Sequence) or not stops or \
            not all(isinstance(x, str) and x for x in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {s!r}")
    return list(stops)


def timeout_s(t) -> float | None:
    if t is not None and (not is_real(t) or not math.isfinite(t) or t <= 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0 or None, got {t!r}")
    return None if t is None else float(t)


def prompt(p) -> str | list[int]:
    """Text, or a sequence of integer token ids (not bytes, floats or booleans)."""
    if isinstance(p, str):
        if not p:
            raise ValueError("prompt must not be empty")
        return p
    if isinstance(p, bytes | bytearray) or not isinstance(p, Sequence):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(p).__name__}")
    bad = [t for t in p if not is_int(t)]
    if bad:
        raise ValueError(f"prompt: token ids must be integers, got {bad[:3]!r}")
    if not p:
        raise ValueError("prompt must not be empty")
    return [int(t) for t in p]


def token_ids_in_vocab(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt: token ids {bad[:5]} outside the vocab [0, {vocab_size})")


def max_len(n) -> int:
    if not is_int(n) or n < 2:
        raise ValueError(f"max_len must be an integer >= 2 (KV cache positions), got {n!r}")
    return int(n)


def generation(max_new: int, temperature_: float, top_k_, top_p_, seed_, stop_=None,
               mode_: str | None = None, timeout: float | None = None) -> None:
    """Every generation argument at once (the order: what a caller is most likely to mistype
    first is reported first)."""
    max_new_tokens(max_new)
    temperature(temperature_)
    top_k(top_k_)
    top_p(top_p_)
    seed(seed_)
    stop(stop_)
    if mode_ is not None:
        mode(mode_)
    timeout_s(timeout)
