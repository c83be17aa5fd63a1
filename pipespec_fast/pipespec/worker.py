"""PipeSpec's asynchronous stage workers and the messages between them.

Every stage runs in its own worker (a thread; see ``docs/ARCHITECTURE.md`` for why threads and
not processes on CPU) and talks to its neighbours only through single-producer FIFO messages:

* :class:`Chunk`, stage i-1 -> stage i: "my sequence is now ``seq[:start] + tokens``" (new
  drafts, or tokens it adopted from a sync), with the rows the drafts were drawn from.
* :class:`Sync`, stage i -> stage i-1: "my sequence is ``seq[:start] + tokens``"; the lower
  stage finds the first divergence, rolls its KV cache back there, adopts the rest and carries
  on. Rollbacks thereby cascade down the pipeline.

Stage i keeps a *mirror* of stage i-1's sequence built from the chunks in order. Drafts are the
mirror's tokens past stage i's own sequence, usable only while the mirror agrees with that
sequence. Consistency is checked by content, so a stale message can waste work but never make
output wrong. Only the last stage's verified tokens reach the output queue.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from pipespec_fast.cpu.linear import set_thread_threads
from pipespec_fast.decoding.sequence import Sequencer, usable_drafts
from pipespec_fast.stages import is_model_free


@dataclass
class Chunk:
    start: int
    tokens: list[int]
    probs: list[torch.Tensor | None]
    confident: list[bool]


@dataclass
class Sync:
    start: int
    tokens: list[int]


class Mirror:
    """Stage i's copy of stage i-1's sequence, and how far it agrees with stage i's own."""

    def __init__(self, prompt: list[int]) -> None:
        self.tokens = list(prompt)
        self.probs: list[torch.Tensor | None] = [None] * len(prompt)
        self.confident: list[bool] = [True] * len(prompt)
        self.agree = len(prompt)  # mirror[:agree] == own seq[:agree], both long enough

    def apply(self, c: Chunk) -> None:
        del self.tokens[c.start :]
        del self.probs[c.start :]
        del self.confident[c.start :]
        self.tokens.extend(c.tokens)
        self.probs.extend(c.probs)
        self.confident.extend(c.confident)
        self.agree = min(self.agree, c.start)

    def own_changed(self, pos: int) -> None:
        self.agree = min(self.agree, pos)

    def common_prefix(self, seq: list[int]) -> int:
        a, lim = self.agree, min(len(seq), len(self.tokens))
        while a < lim and seq[a] == self.tokens[a]:
            a += 1
        self.agree = a
        return a


class InlineDrafter:
    """A model-free lowest stage (the n-gram drafter) run inside the worker above it.

    Its proposals cost microseconds, so a thread of its own would only take the GIL from the
    model stage above. It is driven on demand: the stage above asks for drafts (``fill``) and
    its Syncs are applied at once (``put``); the mirror above stays an exact copy of it.
    """

    def __init__(self, seqr: Sequencer, own_mirror: bool = False) -> None:
        self.s = seqr
        self.inbox = self  # the stage above sends its Syncs here
        self.upper: StageWorker | None = None
        # the upper stage's copy of this drafter's sequence: its main mirror, or (a second,
        # skip-level drafter) one of its own, made at start
        self.own_mirror = own_mirror
        self._mirror: Mirror | None = None

    @property
    def mirror(self) -> Mirror:
        return self._mirror if self.own_mirror else self.upper.mirror

    def start(self, prompt: list[int]) -> None:
        if self.own_mirror:
            self._mirror = Mirror(prompt)
        try:
            self.s.start(prompt)
        except Exception as e:
            raise self._named(e)  # noqa: B904

    def _named(self, e: BaseException) -> BaseException:
        e.pipespec_stage = f"{self.s.index} ({self.s.stage.name})"
        return e

    def put(self, msg: Sync) -> None:
        try:
            changed = self.s.apply_sync(msg.start, msg.tokens)
        except Exception as e:
            raise self._named(e)  # noqa: B904 (re-raised as is, with the stage named)
        if changed is not None:
            n = len(self.s.seq) - changed
            self.mirror.apply(Chunk(changed, self.s.seq[changed:], [None] * n, [True] * n))

    def fill(self, want: int) -> None:
        """Draft until this stage is ``want`` tokens ahead of the stage above (when in sync)."""
        try:
            self._fill(want)
        except Exception as e:
            raise self._named(e)  # noqa: B904

    def _fill(self, want: int) -> None:
        s, up, mirror = self.s, self.upper, self.mirror
        if len(s.seq) < len(up.s.seq) or mirror.common_prefix(up.s.seq) < len(up.s.seq):
            return
        lead = len(s.seq) - len(up.s.seq)
        if lead < want:
            start = len(s.seq)
            s.draft(want - lead)
            mirror.apply(Chunk(start, s.seq[start:], s.probs[start:], s.confident[start:]))


@dataclass
class Emit:
    """Target -> caller: newly verified tokens (``tokens``) or a failure (``error``)."""

    tokens: list[int]
    error: BaseException | None = None
    stage: str | None = None


class StageWorker:
    """Runs one stage of a PipeSpec pipeline until ``stop`` is set."""

    POLL_S = 0.05

    def __init__(
        self,
        seqr: Sequencer,
        index: int,
        n_stages: int,
        window: int,
        max_lead: int,
        stop: threading.Event,
        out: queue.SimpleQueue,
        threads: int | None = None,
        matmul_threads: int | None = None,
        idle: bool = False,
    ) -> None:
        self.s = seqr
        self.idle = idle  # run this worker's thread at idle priority (SCHED_IDLE, Linux)
        self.matmul_threads = matmul_threads
        self.i = index
        self.last = index == n_stages - 1
        self.window = window
        self.max_lead = max_lead
        self.stop = stop
        self.out = out
        self.threads = threads
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.below: StageWorker | InlineDrafter | None = None
        self.above: StageWorker | None = None
        self.mirror: Mirror | None = None
        self.upper_len = 0
        self._last_sync: tuple[int, int] | None = None
        self.limit: int | None = None  # the target stops verifying once it holds this many
        self.thread: threading.Thread | None = None
        # what a draft costs this verifier: its wait for drafts, per draft verified (decayed);
        # the adaptive window weighs it like synchronous decoding weighs drafting time
        self.wait_per_draft_s = 0.0
        self._waited_s = 0.0
        # the target of a 3+-level hierarchy over a model-free lowest stage: a second n-gram
        # drafter on its own sequence, whose free proposals it verifies when the model stage
        # below has nothing usable ready or is not worth waiting for
        self.skip: InlineDrafter | None = None
        self._last_skip_sync: tuple[int, int] | None = None
        # set by the stage above: does it take our drafts now? (its window for them is 0
        # while they do not pay; we then only follow its syncs and leave it the cores)
        self.wanted = True

    # ------------------------------------------------------------------ lifecycle

    def start(self, prompt: list[int]) -> None:
        self.mirror = Mirror(prompt) if self.i > 0 else None
        self.upper_len = len(prompt)
        self.thread = threading.Thread(target=self._main, args=(prompt,),
                                       name=f"pipespec-stage{self.i}-{self.s.stage.name}",
                                       daemon=True)
        self.thread.start()

    def _main(self, prompt: list[int]) -> None:
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            set_thread_threads(self.matmul_threads)
            if self.idle and hasattr(os, "SCHED_IDLE"):  # this thread only (a Linux task)
                try:
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                except OSError:  # refused (a sandbox): run at normal priority
                    self.idle = False
            with self.s.on_stream():  # CUDA: this stage's own stream, overlapping the others
                if isinstance(self.below, InlineDrafter):
                    self.below.start(prompt)
                if self.skip is not None:
                    self.skip.start(prompt)
                self.s.start(prompt)
                self._loop()
        except BaseException as e:  # surfaced to the caller by the output queue
            e.add_note(f"in PipeSpec stage {self.i} ({self.s.stage.name}):\n"
                       + "".join(traceback.format_tb(e.__traceback__)))
            stage = getattr(e, "pipespec_stage", f"{self.i} ({self.s.stage.name})")
            self.out.put(Emit([], error=e, stage=stage))
            self.stop.set()

    # ------------------------------------------------------------------ messages

    def _handle(self, msg) -> None:
        if isinstance(msg, Sync):
            self.upper_len = msg.start + len(msg.tokens)
            changed = self.s.apply_sync(msg.start, msg.tokens)
            if changed is not None:
                if self.mirror is not None:
                    self.mirror.own_changed(changed)
                if self.above is not None:  # tell the stage above what we now hold
                    n = len(self.s.seq) - changed
                    self.above.inbox.put(Chunk(changed, self.s.seq[changed:], [None] * n,
                                               [True] * n))
        elif isinstance(msg, Chunk):
            self.mirror.apply(msg)
        # None: a wake-up (the pipeline is stopping; the loop checks the stop event)

    def _drain(self, block: bool) -> None:
        try:
            msg = self.inbox.get(timeout=self.POLL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(msg)
        while True:
            try:
                self._handle(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _sync_down(self) -> None:
        """Tell the stage below our sequence from the first place its copy may differ."""
        if self.below is None:
            return
        self._last_sync = self._send_sync(self.below.inbox, self.mirror, self._last_sync)

    def _send_sync(self, inbox, mirror: Mirror, last: tuple[int, int] | None
                   ) -> tuple[int, int] | None:
        """Put a Sync of our sequence from the first place ``mirror`` differs, unless it would
        repeat ``last`` (the previous one sent there) with nothing new; returns the new last."""
        seq = self.s.seq
        c = mirror.common_prefix(seq)
        key = (c, len(seq))
        if key == last and c == len(seq):
            return last
        inbox.put(Sync(c, seq[c:]))
        return key

    def _skip_drafts(self) -> tuple[list[int], list[torch.Tensor] | None]:
        """Drafts from the skip-level n-gram drafter: free, so the window is the one for
        drafts that cost nothing."""
        s, sk = self.s, self.skip
        g = s.plan_window(self.window, 0.0)
        if not g:
            return [], None
        self._last_skip_sync = self._send_sync(sk.inbox, sk.mirror, self._last_skip_sync)
        sk.fill(g)
        drafts, rows, _ = self._drafts(g, sk.mirror)
        return drafts, rows

    def _send_up(self, start: int) -> None:
        seq = self.s.seq
        if self.above is not None:
            self.above.inbox.put(Chunk(start, seq[start:], self.s.probs[start:],
                                       self.s.confident[start:]))
        if self.last:
            self.out.put(Emit(seq[start:]))

    # ------------------------------------------------------------------ work

    def _drafts(self, n: int, mirror: Mirror | None = None
                ) -> tuple[list[int], list[torch.Tensor] | None, bool]:
        """Up to ``n`` usable drafts (tokens, rows) and whether the stage below has already
        spoken for our next position (with only unusable guesses when the list is empty);
        ``mirror``: another drafter's copy than the stage below's."""
        seq, m = self.s.seq, mirror or self.mirror
        if m.common_prefix(seq) < len(seq):
            return [], None, False
        L = len(seq)
        spoke = len(m.tokens) > L
        if self.limit is not None:
            n = min(n, self.limit - L)
        toks = usable_drafts(m.tokens[L : L + max(n, 0)], m.confident[L : L + max(n, 0)])
        k = len(toks)
        if self.s.params.greedy:
            return toks, None, spoke
        rows = m.probs[L : L + k]
        k = next((j for j, r in enumerate(rows) if r is None), k)
        return toks[:k], rows[:k], spoke

    def _loop(self) -> None:
        s = self.s
        while not self.stop.is_set():
            self._drain(block=False)
            lead_ok = self.last or (self.wanted and
                                    len(s.seq) - self.upper_len < self.max_lead)
            if self.i > 0 and lead_ok:
                # 0: speculation does not pay now (drafts cost more waiting than they give)
                n = s.window(self.window, self.wait_per_draft_s)
                below = self.below
                if isinstance(below, StageWorker) and below.wanted != (n > 0):
                    below.wanted = n > 0  # pause or resume the model stage below
                    if n > 0:
                        below.inbox.put(None)  # resume now, not at its next poll
                if isinstance(self.below, InlineDrafter):
                    self.below.fill(n)
                drafts, rows, spoke = self._drafts(n)
                skip = not drafts and self.skip is not None
                if skip:
                    drafts, rows = self._skip_drafts()
                # the target goes on alone when the stage below only offers guesses, or when
                # its window is 0 (a middle stage then drafts on its own, below)
                alone = self.last and not drafts and (spoke or n == 0) and \
                    len(s.seq) < (self.limit or 0)
                if drafts or alone:
                    if drafts and not skip:
                        cost = self._waited_s / len(drafts)
                        self.wait_per_draft_s = 0.8 * self.wait_per_draft_s + 0.2 * cost
                    self._waited_s = 0.0
                    start = len(s.seq)
                    s.verify(drafts, rows)
                    self._send_up(start)
                    self._sync_down()
                    continue
            if not self.last and lead_ok:
                start = len(s.seq)
                # a model-free drafter (n-gram) fills its whole lead at once; a model drafts
                # one token per step so that rollbacks reach it between tokens
                free = is_model_free(s.stage)
                s.draft(max(1, self.max_lead - (len(s.seq) - self.upper_len)) if free else 1)
                self._send_up(start)
                if self.i > 0:
                    self._sync_down()
                continue
            if self.i > 0:
                self._sync_down()  # a diverged stage below must learn it, even when we wait
            t = time.perf_counter()
            self._drain(block=True)
            dt = time.perf_counter() - t
            s.stats.idle_s += dt
            if self.i > 0 and lead_ok:  # waiting for drafts (not for the stage above)
                self._waited_s += dt
