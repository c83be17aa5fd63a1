"""Per-stage decoding state shared by every mode (autoregressive, synchronous, PipeSpec).

A :class:`Sequencer` holds one stage's view of the sequence (``seq``: prompt + tokens it has
committed), the distribution each generated token was drawn from (needed when the stage above
verifies them under sampling), and the stage's statistics. Invariant: the stage's KV cache holds
``seq[:stage.cache_len]``; whatever is not cached yet is fed with the next forward.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from pipespec_fast import ops, reference


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters, validated on construction (``ValueError`` names the argument)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        ops.validate_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return ops.probs_from_logits(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class StageStats:
    """What one stage did during a generation (all counts in tokens unless named otherwise)."""

    name: str
    drafted: int = 0  # tokens this stage generated with its own model (not by verifying)
    proposed: int = 0  # draft tokens from the stage below that this stage verified
    accepted: int = 0  # of those, accepted
    rejected: int = 0  # verification steps that ended in a rejection
    rollbacks: int = 0  # times a sync from above truncated this stage's sequence
    forwards: int = 0  # model forward calls
    verify_steps: int = 0  # forward calls that verified drafts
    busy_s: float = 0.0
    idle_s: float = 0.0
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    forward_latency: dict[int, list[float]] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens accepted (alpha of the stage below vs this one)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance estimate (maximum likelihood under i.i.d. acceptance):
        accepted / (accepted + verification steps that ended in a rejection). Unlike
        ``acceptance_rate`` it is not biased low by drafts after a rejection, which are never
        tested."""
        seen = self.accepted + self.rejected
        return self.accepted / seen if seen else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification step (accepted drafts + the verifier's token)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "name", "drafted", "proposed", "accepted", "rejected", "rollbacks", "forwards",
            "verify_steps", "busy_s", "idle_s")}
        d["acceptance_rate"] = self.acceptance_rate
        d["alpha"] = self.alpha
        d["mean_accepted_length"] = self.mean_accepted_length
        return d


def usable_drafts(tokens: list[int], confident: list[bool]) -> list[int]:
    """The drafts worth verifying: ``tokens`` up to the first one marked as a guess."""
    k = next((j for j, c in enumerate(confident) if not c), len(tokens))
    return tokens[:k]


def _seed_for(seed: int | None, index: int) -> int:
    base = seed if seed is not None else int(torch.randint(0, 2**31, ()))
    return (base * 1000003 + index * 7919) & 0x7FFFFFFF


class Sequencer:
    """One stage's sequence, cache bookkeeping, verification and drafting."""

    def __init__(self, stage, params: SamplingParams, index: int, t0: float | None = None):
        self.stage = stage
        self.params = params
        self.index = index
        self.seq: list[int] = []
        self.probs: list[torch.Tensor | None] = []  # per position; None for prompt / adopted
        # per position: is this token worth verifying? False only for drafts a stage marks as
        # guesses (an n-gram stage's fallback when no earlier occurrence matched).
        self.confident: list[bool] = []
        self.stats = StageStats(stage.name)
        self.seed = _seed_for(params.seed, index)
        self.rng_offset = 0
        self.adaptive = True
        self._acc = 0.0  # decayed counts of accepted drafts / rejections (adaptive window)
        self._rej = 0.0
        self._verify_lat: dict[int, tuple[float, float]] = {}  # n -> (decayed mean s, weight)
        self.draft_cost_s: float | None = None  # decayed mean time of drafting one token
        self._alone_steps = 0  # consecutive window() == 0 answers
        self._explore_every = self.EXPLORE_EVERY  # doubles while explorations keep failing
        self.t0 = time.perf_counter() if t0 is None else t0
        self._device = stage.device
        self._cuda = self._device.type == "cuda"
        if self._cuda:  # one stream per stage; a pinned buffer + event for the step's result
            self.stream = torch.cuda.Stream(self._device)
            self._pinned = torch.empty(2, dtype=torch.int64, pin_memory=True)
            self._event = torch.cuda.Event()

    def on_stream(self):
        """Context in which this stage's work is queued (its own CUDA stream; no-op on CPU)."""
        return torch.cuda.stream(self.stream) if self._cuda else contextlib.nullcontext()

    def _to_host(self, num: torch.Tensor, nxt: torch.Tensor) -> tuple[int, int]:
        """The one host synchronisation of a verify step: two ints."""
        if not self._cuda:
            return int(num), int(nxt)
        self._pinned.copy_(torch.stack([num, nxt]), non_blocking=True)
        self._event.record(self.stream)
        self._event.synchronize()  # waits for this stage's stream only
        a, b = self._pinned.tolist()
        return a, b

    # ------------------------------------------------------------------ state

    def start(self, prompt: list[int]) -> None:
        """Reset to ``prompt`` and prefill all of it but the last token."""
        self.stage.rollback(0)
        self.seq = list(prompt)
        self.probs = [None] * len(prompt)
        self.confident = [True] * len(prompt)
        if len(prompt) > 1:
            self._forward(self.seq[:-1], last_n=1, kind="prefill")

    def truncate(self, length: int) -> None:
        """Drop tokens at and after ``length`` (and their cached K/V)."""
        del self.seq[length:]
        del self.probs[length:]
        del self.confident[length:]
        if self.stage.cache_len > length:
            self.stage.rollback(length)

    def apply_sync(self, start: int, tokens: list[int]) -> int | None:
        """Adopt ``seq[:start] + tokens`` from the stage above where it differs from ours.

        Returns the first position that changed (``None`` if nothing did). Tokens of ours beyond
        the synced range are kept when the synced range agrees with them.
        """
        end = start + len(tokens)
        d = start
        while d < end and d < len(self.seq) and self.seq[d] == tokens[d - start]:
            d += 1
        if d == end:
            return None
        if d < len(self.seq):
            self.stats.rollbacks += 1
            self.truncate(d)
        self.seq.extend(tokens[d - start :])
        self.probs.extend([None] * (end - d))
        self.confident.extend([True] * (end - d))
        return d

    # ------------------------------------------------------------------ model work

    def _forward(self, tokens: list[int], last_n: int, kind: str) -> torch.Tensor:
        t = time.perf_counter()
        ids = torch.tensor(tokens, dtype=torch.int64, device=self._device)
        logits = self.stage.forward(ids, last_n=last_n)
        self._record(t, kind, len(tokens))
        return logits

    def _record(self, t: float, kind: str, n: int) -> None:
        now = time.perf_counter()
        st = self.stats
        st.forwards += 1
        st.busy_s += now - t
        st.timeline.append((t - self.t0, now - self.t0, kind))
        st.forward_latency.setdefault(n, []).append(now - t)

    VERIFY_MAX_N = 64  # block sizes above this (a prompt fed with drafts) are not verify steps

    def _note_verify_latency(self, n: int, seconds: float) -> None:
        """Decayed mean latency and weight per verify block size (for :meth:`window`): every
        size's weight decays at each step, so sizes not seen for a while (a slow warm-up, a
        burst of contention) fade out of the fit."""
        if n > self.VERIFY_MAX_N:
            return
        lat = self._verify_lat
        for k in list(lat):
            m, w = lat[k]
            if w * 0.95 < 0.05:
                del lat[k]
            else:
                lat[k] = (m, w * 0.95)
        mean, w = lat.get(n, (seconds, 0.0))
        w += 1.0
        lat[n] = (mean + (seconds - mean) / min(w, 5.0), w)

    def _next_offset(self) -> int:
        self.rng_offset += 1
        return self.rng_offset

    def draft(self, n: int) -> int:
        """Generate ``n`` tokens autoregressively with this stage's own model; returns n."""
        for _ in range(n):
            feed = self.seq[self.stage.cache_len :]
            t = time.perf_counter()
            logits = self._forward(feed, last_n=1, kind="draft")
            if self.params.greedy:
                tok = int(logits[0].argmax())
                self.probs.append(None)
            else:
                p = self.params.probs(logits)
                tok = int(ops.sample_from_probs(p, self.seed, self._next_offset())[0])
                self.probs.append(p[0])
            self.seq.append(tok)
            self.confident.append(self._stage_is_confident())
            dt = time.perf_counter() - t
            self.draft_cost_s = dt if self.draft_cost_s is None else \
                0.8 * self.draft_cost_s + 0.2 * dt
        self.stats.drafted += n
        return n

    EXPLORE_EVERY = 8  # after this many steps without drafts, verify one to re-measure ...
    EXPLORE_MAX = 64  # ... and twice as many after each exploration that changed nothing

    def window(self, max_n: int, draft_cost_s: float = 0.0) -> int:
        """Adaptive draft window: how many drafts to verify in the next forward (0: none,
        decode one token alone).

        With the stage's recent acceptance ``a`` (decayed counts, smoothed towards 1/2) and its
        measured verification latency ``L(n) ~ c0 + c1 n`` (a line through the recent verify
        forwards), the ``g`` in ``[0, max_n]`` that maximises the expected committed tokens per
        second, ``(1 - a^(g+1)) / (1 - a) / (L(g + 1) + g * draft_cost_s)``
        (``draft_cost_s``: what producing one more draft costs this stage's timeline, e.g. in
        synchronous decoding). ``g = 0`` wins when a forward costs more per extra row than the
        drafts are worth (a compute-bound CPU with a weak draft): speculation is switched off,
        except one draft after :data:`EXPLORE_EVERY` steps to keep ``a`` and ``L`` current (the
        interval doubles, up to :data:`EXPLORE_MAX`, while speculation keeps not paying: an
        exploration costs a wait for a draft in PipeSpec).
        Until two block sizes have been timed (one step alone first times ``L(1)`` when only
        verify sizes were), and always for seeded sampling (whose draws must not depend on
        timings): the smallest ``g >= 1`` with ``a^g <= 0.15``. Non-adaptive
        stages always take ``max_n``."""
        if not self.adaptive:
            return max_n
        best = self.plan_window(max_n, draft_cost_s)
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

    def plan_window(self, max_n: int, draft_cost_s: float = 0.0) -> int | None:
        """The rule of :meth:`window` without its exploration state (no side effects): the
        best ``g`` for drafts costing ``draft_cost_s`` each, or ``None`` when one step alone
        should first time ``L(1)``."""
        if not self.adaptive:
            return max_n
        a = (self._acc + 1.0) / (self._acc + self._rej + 2.0)
        # seeded sampling stays reproducible: its windows (and so its random draws) must not
        # depend on timings
        timed = self.params.greedy or self.params.seed is None
        line = self._latency_line() if timed else None
        if line is None:
            if timed and self._verify_lat and 1 not in self._verify_lat:
                return None
            if a >= 0.999:
                return max_n
            return max(1, min(max_n, math.ceil(math.log(0.15) / math.log(a))))
        c0, c1 = line
        best, best_rate = 0, 1.0 / (c0 + c1)
        expected = 1.0
        for g in range(1, max(1, max_n) + 1):
            expected += a**g  # 1 + a + ... + a^g
            rate = expected / (c0 + c1 * (g + 1) + g * draft_cost_s)
            if rate > best_rate:
                best, best_rate = g, rate
        return best

    def _latency_line(self) -> tuple[float, float] | None:
        """``(c0, c1)`` of ``L(n) = c0 + c1 n`` through the decayed mean latency of each timed
        verify block size (least squares, weighted by how often each size ran; ``c1 >= 0``),
        or ``None`` before two sizes have been timed."""
        pts = self._verify_lat
        if len(pts) < 2:
            return None
        sw = swn = swt = swnn = swnt = 0.0
        for n, (mean, w) in pts.items():
            sw += w
            swn += w * n
            swt += w * mean
            swnn += w * n * n
            swnt += w * n * mean
        den = sw * swnn - swn * swn
        c1 = max(0.0, (sw * swnt - swn * swt) / den) if den > 0 else 0.0
        c0 = (swt - c1 * swn) / sw
        if c0 + c1 <= 0:
            return None
        return c0, c1

    def _stage_is_confident(self) -> bool:
        """Model stages always are; a stage exposing ``last_match_len`` (the n-gram drafter)
        is when its last proposal came from a real match of at least ``min_confident_match``."""
        m = getattr(self.stage, "last_match_len", None)
        return m is None or m >= getattr(self.stage, "min_confident_match", 1)

    def verify(self, drafts: list[int], draft_probs: list[torch.Tensor] | None) -> int:
        """Verify a chain of draft tokens in one forward and commit the outcome.

        Appends the accepted drafts plus the verifier's own next token (the correction on a
        rejection, the bonus when all were accepted) to ``seq``. Returns the number accepted.
        ``draft_probs`` (sampling only) are the rows the drafts were drawn from.
        """
        n = len(drafts)
        base = self.stage.cache_len
        feed = self.seq[base:] + drafts
        uncached = len(feed) - n
        t = time.perf_counter()
        ids = torch.tensor(feed, dtype=torch.int64, device=self._device)
        logits = self.stage.forward(ids, last_n=n + 1)
        dtok = ids[uncached:]
        parents = reference.chain_parents(n, self._device)
        if self.params.greedy:
            target_ids = logits.argmax(-1)
            _, num, nxt = ops.greedy_accept(dtok, parents, target_ids)
            p = None
        else:
            p = self.params.probs(logits)
            if self._cuda:  # rows made on the lower stage's stream are read on ours
                for r in draft_probs:
                    if r.device == self._device:
                        r.record_stream(self.stream)
            q = torch.stack([r.to(self._device, non_blocking=True) for r in draft_probs]) \
                if n else p[:0]
            _, num, nxt = ops.stochastic_accept(dtok, parents, q, p, self.seed,
                                                self._next_offset())
        num_i, nxt_i = self._to_host(num, nxt)  # the one host sync of a verify step
        self.stage.rollback(base + uncached + num_i)
        self._record(t, "verify", len(feed))
        self._note_verify_latency(len(feed), time.perf_counter() - t)
        self.seq.extend(drafts[:num_i])
        self.seq.append(nxt_i)
        self.confident.extend([True] * (num_i + 1))
        if p is None:
            self.probs.extend([None] * (num_i + 1))
        else:
            self.probs.extend(p[: num_i + 1].unbind(0))
        if n:
            self._acc = 0.9 * self._acc + num_i
            self._rej = 0.9 * self._rej + float(num_i < n)
        st = self.stats
        st.verify_steps += 1
        st.proposed += n
        st.accepted += num_i
        st.rejected += int(num_i < n)
        return num_i
