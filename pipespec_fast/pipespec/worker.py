"""``StageWorker``: one PipeSpec stage in its own thread: its lifecycle, its inbox and the
handling of the messages every role shares (``pipespec_fast.pipespec.messages``).

What a stage does with its turn (draft, verify, or both) is its role's ``step``
(``pipespec_fast.pipespec.roles``); who feeds whom is ``pipespec_fast.pipespec.topology``. See
``docs/ARCHITECTURE.md`` for why threads and not processes on CPU.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

import torch

from pipespec_fast.cpu.linear import set_threads_for_this_thread
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.pipespec.messages import Chunk, Emit, Sync, Wanted
from pipespec_fast.pipespec.mirror import Mirror
from pipespec_fast.stages import is_model_free


class StageWorker:
    """Runs one stage of a PipeSpec pipeline until ``stop`` is set.

    Args:
        seqr: the stage's sequence and model work.
        index: its position in the pipeline (0: the lowest).
        max_lead: a drafting stage drafts while fewer than this many tokens ahead of the
            stage above (its last known length, from the Syncs it receives).
        stop: set by whoever ends the generation (the caller, or a failing worker).
        out: where failures (and, for the target, verified tokens) go to the caller.
        threads: torch intra-op threads of this worker's thread (``None``: leave as is).
        matmul_threads: our kernels' threads for this worker (``threads.CpuThreads``).
        idle: run this worker's thread at idle priority (``SCHED_IDLE``, Linux).

    Subclasses implement :meth:`step`: one unit of work, ``False`` when nothing is to do
    until a message arrives."""

    POLL_S = 0.05
    DRAFT_RUN = 4  # CUDA: 4 SmolLM2-sized tokens < one 8B-sized verify (estimated)

    def __init__(self, seqr: Sequencer, index: int, max_lead: int, stop: threading.Event,
                 out: queue.SimpleQueue, threads: int | None = None,
                 matmul_threads: int | None = None, idle: bool = False) -> None:
        self.s = seqr
        self.i = index
        self.max_lead = max_lead
        self.stop = stop
        self.out = out
        self.threads = threads
        self.matmul_threads = matmul_threads
        self.idle = idle
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.above: StageWorker | None = None  # set by the topology
        self.mirror: Mirror | None = None  # a verifier's copy of the stage below
        self.upper_len = 0  # the stage above's length, as its last Sync told
        # does the stage above take our drafts now? (a Wanted message: while its window for
        # them is 0 we only follow its syncs and leave it the cores)
        self.wanted = True
        # prefill when first needed (``topology.build``: the stages below the target start
        # paused, so a run whose target decodes without them never pays their prefill)
        self.defer_prefill = False
        self.thread: threading.Thread | None = None
        self._model_free = is_model_free(seqr.stage)

    # ------------------------------------------------------------------ lifecycle

    def start(self, prompt: list[int]) -> None:
        self.upper_len = len(prompt)
        self.thread = threading.Thread(target=self._main, args=(prompt,),
                                       name=f"pipespec-stage{self.i}-{self.s.stage.name}",
                                       daemon=True)
        self.thread.start()

    def _main(self, prompt: list[int]) -> None:
        try:
            self._set_up_thread()
            with self.s.on_stream():  # CUDA: this stage's own stream, overlapping the others
                self._begin(prompt)
                self._loop()
                self.s.dev.finish()  # its last kernels, before the next generation's own
        except BaseException as e:  # surfaced to the caller by the output queue
            e.add_note(f"in PipeSpec stage {self.s.label}:\n"
                       + "".join(traceback.format_tb(e.__traceback__)))
            stage = getattr(e, "pipespec_stage", self.s.label)
            self.out.put(Emit([], error=e, stage=stage))
            self.stop.set()

    def _set_up_thread(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        set_threads_for_this_thread(self.matmul_threads)
        if self.idle and hasattr(os, "SCHED_IDLE"):  # this thread only (a Linux task)
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError:  # refused (a sandbox): run at normal priority
                self.idle = False

    def _begin(self, prompt: list[int]) -> None:  # reset to the prompt (and prefill)
        self.s.start(prompt, prefill=not self.defer_prefill)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._drain(block=False)
            if not self.step():
                self._wait()

    def step(self) -> bool:
        raise NotImplementedError

    def _wait(self) -> float:
        """Block until a message arrives (or the poll interval passes); returns the wait."""
        t = time.perf_counter()
        self._drain(block=True)
        dt = time.perf_counter() - t
        self.s.stats.idle_s += dt
        return dt

    # ------------------------------------------------------------------ messages

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

    def _handle(self, msg) -> None:
        if isinstance(msg, Chunk):
            self.mirror.apply(msg)
        elif isinstance(msg, Sync):
            self._adopt(msg)
        elif isinstance(msg, Wanted):
            self.wanted = msg.wanted
        # Wake: the pipeline is stopping; the loop checks the stop event

    def _adopt(self, msg: Sync) -> None:
        """Take the stage above's sequence; tell it what we now hold if that changed ours."""
        self.upper_len = msg.start + len(msg.tokens)
        changed = self.s.apply_sync(msg.start, msg.tokens)
        if changed is not None:
            if self.mirror is not None:
                self.mirror.own_changed(changed)
            if self.above is not None:
                self.above.inbox.put(Chunk(changed, TokenSpan(self.s.seq[changed:])))

    def _publish(self, start: int) -> None:
        """Our sequence changed from ``start`` on (a draft or a verification)."""
        if self.above is not None:
            self.above.inbox.put(Chunk(start, self.s.span[start:], self.s.dev.ready()))

    # ------------------------------------------------------------------ shared work

    def _lead_ok(self) -> bool:
        """Wanted, and not yet ``max_lead`` tokens ahead of the stage above."""
        return self.wanted and len(self.s.seq) - self.upper_len < self.max_lead

    def _draft(self) -> None:
        """Extend our sequence: a model-free stage fills its whole lead; a model drafts one
        token per step on the CPU (rollbacks reach it between tokens), a run of up to
        ``DRAFT_RUN`` where reads are deferred (CUDA: one host sync per run, not per token)."""
        s, start = self.s, len(self.s.seq)
        lead = max(1, self.max_lead - (start - self.upper_len))
        s.draft(lead if self._model_free else min(lead, self.DRAFT_RUN)
                if s.dev.deferred_reads else 1)
        self._publish(start)
