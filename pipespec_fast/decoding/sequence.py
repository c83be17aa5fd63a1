"""Per-stage decoding state shared by every mode (autoregressive, synchronous, PipeSpec).

A :class:`Sequencer` holds one stage's view of the sequence (``span``: prompt + tokens it has
committed, each with the distribution it was drawn from, needed when the stage above verifies
it under sampling) and does the stage's model work on it: prefill, drafting, verification and
adopting another stage's sequence. Invariant: the stage's KV cache holds
``seq[:stage.cache_len]``; whatever is not cached yet is fed with the next forward.

Its helpers each hold one concern: ``StageSampler`` (its random stream, draws, acceptance op),
``StageDevice`` (its CUDA stream and the step's one host sync), ``WindowPolicy`` (how many
drafts to verify next), ``StageStats`` (what it did).
"""

from __future__ import annotations

import time

import torch

from pipespec_fast.decoding.device import StageDevice
from pipespec_fast.decoding.regime import LEAN, Regimes
from pipespec_fast.decoding.sampling import (
    NON_FINITE,
    POINT_MASS,
    SamplingParams,
    StageSampler,
    is_point_mass,
)
from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.decoding.stats import StageStats
from pipespec_fast.decoding.window import WindowPolicy, policy_for
from pipespec_fast.errors import NonFiniteLogitsError, StageError


# long: one stage's sequence and all its model work (prefill, draft, verify, a step alone,
# syncs) in one place, since every one of them keeps the cache invariant above
class Sequencer:
    """One stage's sequence, cache bookkeeping, verification and drafting.

    Args:
        stage: a :class:`~pipespec_fast.stages.Stage`.
        params: the generation's sampling parameters.
        index: the stage's position in the pipeline (seeds its random stream).
        t0: the generation's start (``perf_counter``), origin of the stats' timeline.
        adaptive: choose each window by the stage's measurements
            (:class:`~pipespec_fast.decoding.window.WindowPolicy`); ``False``: the largest.
        reproducible: the mode promises that a seed repeats the draws (ar, sync): seeded
            sampling then keeps timing-free windows. ``False`` (PipeSpec) lets them adapt.
        keep_rows: keep the row each token was drawn from until the stage above has seen it
            (sampling); ``False`` for the target, whose tokens nobody verifies.
        free_drafts: the stage below is model-free (its drafts cost this stage nothing, which
            the timing-free windows of seeded sync then know).
    """

    CATCH_UP = 4  # a draft forward feeding more tokens than this is a (deferred) prefill

    def __init__(self, stage, params: SamplingParams, index: int, t0: float | None = None,
                 adaptive: bool = True, reproducible: bool = True, keep_rows: bool = True,
                 free_drafts: bool = False) -> None:
        self.stage = stage
        self.params = params
        self.index = index
        self.keep_rows = keep_rows
        self.span = TokenSpan()
        self.stats = StageStats(stage.name)
        self.sampler = StageSampler(params, index)
        self.policy = policy_for(params, reproducible, adaptive, free_drafts)
        self._skip_policy: WindowPolicy | None = None  # skip_level_policy()'s, without regimes
        self.draft_cost_s: float | None = None  # decayed mean time of drafting one token
        caps = stage.capabilities  # (read once: a stage may build them per read)
        self._marks_guesses = caps.confidence
        # a model-free stage that proposes without a row (the n-gram drafter): its token
        # directly, what a draw from its one-hot row gives at any temperature / top-k / top-p
        # (sampling keeps that row, for the stage above to verify the draft against)
        self._proposes = caps.model_free and getattr(stage, "propose", None) is not None
        self.t0 = time.perf_counter() if t0 is None else t0
        self.dev = StageDevice(stage.device)
        # the target's regime bandit (which draft sources pay, end to end), when the mode has
        # one (``decoding/regime.py``; set by ``PolicyMemory.attach``)
        self.regimes: Regimes | None = None

    @property
    def seq(self) -> list[int]:
        """The committed token ids (``span.tokens``)."""
        return self.span.tokens

    def on_stream(self):
        """Context in which this stage's work is queued (its own CUDA stream; no-op on CPU)."""
        return self.dev.context()

    # ------------------------------------------------------------------ state

    def start(self, prompt: list[int], prefill: bool = True) -> None:
        """Reset to ``prompt`` and prefill all of it but the last token (``prefill=False``:
        the stage's first forward feeds it, when the stage is first needed)."""
        self.stage.rollback(0)
        self.span = TokenSpan.known(prompt)
        if prefill and len(prompt) > 1:
            self._forward(self.span.tokens[:-1], last_n=1, kind="prefill")
            # the prompt is kept: a stage that publishes what it has committed (a target's
            # features, read by a feature head) learns it here, not at its next forward
            self.stage.rollback(len(prompt) - 1)

    def truncate(self, length: int) -> None:
        """Drop tokens at and after ``length`` (and their cached K/V)."""
        self.span.truncate(length)
        if self.stage.cache_len > length:
            self.stage.rollback(length)

    def rewind(self, length: int) -> None:
        """:meth:`truncate` to ``length`` tokens, ready to draft after them: the last one is
        left uncached (a forward feeds at least one token)."""
        self.truncate(length)
        if 0 < length <= self.stage.cache_len:
            self.stage.rollback(length - 1)

    def apply_sync(self, start: int, tokens: list[int], strict: bool = False) -> int | None:
        """Adopt ``seq[:start] + tokens`` from the stage above where it differs from ours.

        Returns the first position that changed (``None`` if nothing did). Tokens of ours beyond
        the synced range are kept when the synced range agrees with them. A sync that begins
        past our sequence cannot be adopted (we do not hold the tokens before it): in PipeSpec
        it was computed from a stale copy of ours (we truncated, and the Chunk saying so is on
        its way up; the stage above sends a new Sync once it arrives), so it is ignored;
        ``strict`` (the synchronous modes, where every sync is exact) raises instead.
        """
        seq, end = self.span.tokens, start + len(tokens)
        if start > len(seq):
            if strict:
                raise ValueError(f"apply_sync: start {start} is past this stage's {len(seq)} "
                                 "tokens (a sync must begin within the sequence it corrects)")
            return None
        self.span.forget_rows(end)  # the stage above holds these positions: never verified again
        d = start
        while d < end and d < len(seq) and seq[d] == tokens[d - start]:
            d += 1
        if d == end:
            return None
        if d < len(seq):
            self.stats.rollbacks += 1
            self.truncate(d)
        self.span.extend_known(tokens[d - start :])
        return d

    @property
    def label(self) -> str:
        """How errors name this stage: its index and name, ``1 (draft)``."""
        return f"{self.index} ({self.stage.name})"

    def use_regime_policy(self) -> None:
        """The target's window policy for its current regime (``self.regimes``): each regime
        verifies other drafts (the draft model's, the n-gram drafter's), so each keeps its own
        acceptance and latencies."""
        r = self.regimes
        if r is None:
            return
        self.policy = self._arm_policy(r.arm)
        self.stats.set_arm(r.arm)

    def _arm_policy(self, arm: str) -> WindowPolicy:
        """The bandit's policy for ``arm``, made when first needed: the first one made is the
        generation's own policy; ``lean``'s drafts cost the target nothing."""
        r = self.regimes
        if arm not in r.policies:
            r.policies[arm] = self.policy if not r.policies else WindowPolicy(
                self.policy.timed, self.policy.adaptive, free=arm == LEAN)
        return r.policies[arm]

    def skip_level_policy(self) -> WindowPolicy:
        """The window policy for the model-free lowest stage's drafts verified by this target
        straight, past the model stages between (synchronous skip-level steps, after
        :meth:`use_regime_policy`): the ``lean`` regime's, which verifies the same drafts, when
        a bandit runs; else one of its own for the generation. Those drafts cost the target
        nothing."""
        if self.regimes is not None:
            return self._arm_policy(LEAN)
        if self._skip_policy is None:
            p = self.policy
            self._skip_policy = WindowPolicy(p.timed, p.adaptive, free=True)
        return self._skip_policy

    def window(self, max_n: int, draft_cost_s: float = 0.0) -> int:
        """How many drafts to verify in the next forward (0: decode one token alone):
        :meth:`WindowPolicy.choose` on this stage's measurements."""
        return self.policy.choose(max_n, draft_cost_s)

    # ------------------------------------------------------------------ model work

    def _forward(self, tokens: list[int], last_n: int, kind: str) -> torch.Tensor:
        t = time.perf_counter()
        ids = self.dev.upload(tokens)
        logits = self.stage.forward(ids, last_n=last_n)  # [last_n, V]
        self.stats.record_forward(kind, len(tokens), t, time.perf_counter(), self.t0)
        return logits

    def draft(self, n: int) -> int:
        """Generate ``n`` tokens autoregressively with this stage's own model; returns n."""
        if self.dev.deferred_reads and not self._marks_guesses:
            return self._draft_run(n)
        span = self.span
        propose = self.stage.propose if self._proposes else None
        for _ in range(n):
            t = time.perf_counter()
            feed = span.tokens[self.stage.cache_len :]
            # more than a correction or two to feed: a deferred prefill, or the catch-up on
            # what the stage above committed while this stage was left out
            catch_up = len(feed) > self.CATCH_UP
            kind = "prefill" if catch_up else "draft"
            if propose is not None:
                tok = propose(feed)
                row = None if self.params.greedy or not self.keep_rows else POINT_MASS
                self.stats.record_forward(kind, len(feed), t, time.perf_counter(), self.t0)
            else:
                tok, row = self._draw(self._forward(feed, last_n=1, kind=kind))
            span.append(tok, row if self.keep_rows else None, self._proposal_confident())
            if not catch_up:
                self.note_draft_cost(time.perf_counter() - t)
        self.stats.drafted += n
        return n

    def _draft_rows(self, drafts: list[int], rows: list[torch.Tensor], ready=None
                    ) -> torch.Tensor:
        """The ``[n, V]`` rows the drafts were drawn from, on this stage's device, or
        :data:`POINT_MASS` when every one is a point mass (a model-free drafter's); point
        masses among other rows become their one-hot rows."""
        if all(map(is_point_mass, rows)):
            return POINT_MASS
        if any(map(is_point_mass, rows)):
            rows = [self._one_hot(t) if is_point_mass(r) else r
                    for t, r in zip(drafts, rows, strict=True)]
        return self.dev.rows_here(rows, ready)

    def _one_hot(self, tok: int) -> torch.Tensor:
        """The ``[V]`` probabilities of a one-hot logits row at ``tok`` (exactly 1 there)."""
        row = torch.zeros(self.stage.vocab_size, dtype=torch.float32, device=self.stage.device)
        row[tok] = 1.0
        return row

    def _draft_run(self, n: int) -> int:
        """:meth:`draft` with one host read for the whole run (``dev.deferred_reads``): each
        drawn token stays on the device and is the next forward's input; the ``n`` ids and
        the run's finiteness come to the host together at the end. The same tokens, rows and
        random stream as drawing them one by one."""
        if n <= 0:
            return 0
        t = time.perf_counter()
        before = self.stage.cache_len
        feed = self.span.tokens[before:]
        catch_up = len(feed) > self.CATCH_UP
        ids = self.dev.upload(feed)
        toks, rows, oks = [], [], []
        for j in range(n):
            tf = time.perf_counter()
            kind = "prefill" if catch_up and j == 0 else "draft"
            logits = self.stage.forward(ids, last_n=1)  # [1, V]
            self.stats.record_forward(kind, ids.shape[0], tf, time.perf_counter(), self.t0)
            ids, row, ok = self.sampler.draw_on_device(logits)
            toks.append(ids)
            rows.append(row if self.keep_rows else None)
            oks.append(ok)
        *got, ok = self.dev.read(*toks, torch.stack(oks).all())  # the run's one host sync
        if not ok:  # nothing of the run is committed: its cached K/V goes too
            self.stage.rollback(before)
            e = NonFiniteLogitsError(NON_FINITE)
            raise StageError(self.label, e) from e
        self.span.extend(TokenSpan(got, rows))
        if not catch_up:
            self.note_draft_cost((time.perf_counter() - t) / n)
        self.stats.drafted += n
        return n

    def _draw(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """One token from ``logits`` ``[1, V]`` and its row (:meth:`StageSampler.draw`), read
        through the stage device where reads are deferred (CUDA: an event wait on this
        stage's stream, not a synchronising ``.tolist()``); a non-finite row names the stage."""
        try:
            if not self.dev.deferred_reads:
                return self.sampler.draw(logits)
            tok, row, finite = self.sampler.draw_on_device(logits)
            tok_i, ok = self.dev.read(tok, finite)
            if not ok:
                raise NonFiniteLogitsError(NON_FINITE)
            return tok_i, row
        except NonFiniteLogitsError as e:
            raise StageError(self.label, e) from e

    def note_draft_cost(self, dt: float) -> None:
        self.draft_cost_s = dt if self.draft_cost_s is None else 0.8 * self.draft_cost_s + 0.2 * dt

    def _proposal_confident(self) -> bool:
        """Model stages' proposals always are; a stage that marks guesses
        (``capabilities.confidence``) tells by the length of its last match."""
        if not self._marks_guesses:
            return True
        return self.stage.last_match_len >= self.stage.min_confident_match

    def verify(self, drafts: list[int], draft_probs: list[torch.Tensor] | None,
               ready=None) -> int:
        """Verify a chain of draft tokens in one forward and commit the outcome.

        Appends the accepted drafts plus the verifier's own next token (the correction on a
        rejection, the bonus when all were accepted) to ``seq``. Returns the number accepted.
        ``draft_probs`` (sampling only) are the ``[V]`` rows the drafts were drawn from;
        ``ready`` the event after which they are complete (CUDA, ``StageDevice.rows_here``).
        """
        n = len(drafts)
        base = self.stage.cache_len
        feed = self.span.tokens[base:] + drafts
        uncached = len(feed) - n
        t = time.perf_counter()
        if n == 0:
            return self._step_alone(feed, t)
        ids = self.dev.upload(feed)
        logits = self.stage.forward(ids, last_n=n + 1)  # [n + 1, V]
        q = self._draft_rows(drafts, draft_probs, ready) if n and not self.params.greedy \
            else None
        num, nxt, finite, p = self.sampler.accept(ids[uncached:], logits, q,
                                                  on_host=not self.dev.deferred_reads)
        num_i, nxt_i, ok = self.dev.to_host(num, nxt, finite)  # the step's one host sync
        if not ok:
            e = NonFiniteLogitsError(NON_FINITE)
            raise StageError(self.label, e) from e
        self.stage.rollback(base + uncached + num_i)
        now = time.perf_counter()
        self.stats.record_forward("verify", len(feed), t, now, self.t0)
        if uncached <= self.CATCH_UP:  # not a catch-up on many tokens: a verify latency
            self.policy.note_latency(len(feed), now - t)
        committed = drafts[:num_i]
        committed.append(nxt_i)
        rows = p[: num_i + 1].unbind(0) if p is not None and self.keep_rows else None
        self.span.extend_known(committed, rows)
        self.policy.note_verify(n, num_i)
        self.stats.record_verify(n, num_i)
        return num_i

    def _step_alone(self, feed: list[int], t: float) -> int:
        """:meth:`verify` without drafts: one token of our own, a plain draw from our
        distribution (the acceptance op over no drafts draws the same distribution at 2.7x
        the cost under sampling: 0.24 against 0.09 ms on the default target's vocabulary)."""
        logits = self._forward(feed, last_n=1, kind="verify")  # [1, V]
        tok, row = self._draw(logits)
        now = time.perf_counter()
        if len(feed) <= self.CATCH_UP:
            self.policy.note_latency(len(feed), now - t)
        self.span.extend_known([tok], [row] if row is not None and self.keep_rows else None)
        self.stats.record_verify(0, 0)
        return 0
