"""One PipeSpec generation: start the workers, hand the target's verified tokens to the
caller as they come, surface a failure at once, and stop every worker at the end."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.errors import GenerationTimeout, PipelineClosedError, StageError
from pipespec_fast.pipespec import topology
from pipespec_fast.pipespec.messages import WAKE, Emit
from pipespec_fast.pipespec.topology import PipeSpecSettings

ERROR_WAIT_S = 2.0
OUT_POLL_S = 0.5  # how often a caller waiting for tokens checks that some worker still runs


class PipeSpecRun:
    """The workers of one generation (``topology.build``) and the output loop over them.

    A worker that raises puts the exception on the output queue and sets the shared stop
    event; :meth:`tokens` raises it as :class:`StageError` naming the stage. :meth:`close`
    (idempotent) stops and joins every worker: the caller calls it when it has enough tokens,
    on a failure, or when a stream is abandoned.
    """

    def __init__(self, seqrs: list[Sequencer], settings: PipeSpecSettings, limit: int,
                 matmul_threads: list[int | None], idle: list[bool] | None = None,
                 emit_every: int = 1, stop_ids: frozenset[int] = frozenset()) -> None:
        self._stop = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False  # close() was called (by the caller, or from another thread)
        self.workers = topology.build(seqrs, settings, limit, matmul_threads, idle,
                                      self._stop, self._out)
        # the target sends its tokens every emit_every tokens, at the limit and at a stop id
        # (``TargetWorker.emit_every``: 1 for a stream, more for generate())
        self.workers[-1].emit_every = emit_every
        self.workers[-1].stop_ids = frozenset(stop_ids)

    def tokens(self, prompt: list[int], deadline: float | None = None
               ) -> Iterator[list[int]]:
        """Start the workers on ``prompt``; yield each list of newly verified target tokens.
        ``deadline`` (``time.monotonic()``): raise :class:`GenerationTimeout` once past it."""
        workers = self.workers
        for w in workers:
            w.start(prompt)
        while True:
            msg: Emit | None = next_output(self._out, deadline, self.closed)
            if msg is None:
                if not any(w.thread.is_alive() for w in workers):
                    raise RuntimeError("all PipeSpec workers exited without output")
                continue
            if msg.error is not None:
                if isinstance(msg.error, StageError):
                    raise msg.error
                raise StageError(msg.stage, msg.error) from msg.error
            yield msg.tokens

    def close(self, join_s: float = ERROR_WAIT_S + 30) -> list[str]:
        """Stop every worker and wait up to ``join_s`` for each; returns the names of those
        still running then (a stage stuck inside its forward cannot be interrupted)."""
        self.closed = True
        workers, self.workers = self.workers, []
        if not workers:
            return []
        self._stop.set()
        for w in workers:  # wake a worker blocked on its inbox now, not at its next poll
            w.inbox.put(WAKE)
        end = time.monotonic() + join_s
        for w in workers:
            if w.thread is not None:
                w.thread.join(timeout=max(0.0, end - time.monotonic()))
        return [w.thread.name for w in workers if w.thread is not None and w.thread.is_alive()]


def next_output(out: queue.SimpleQueue, deadline: float | None, closed: bool):
    """The next message a run's workers put on ``out``, or ``None`` after waiting
    :data:`OUT_POLL_S` for it; raises :class:`GenerationTimeout` once past ``deadline``
    (``time.monotonic()``) and :class:`PipelineClosedError` when nothing came and the
    pipeline was ``closed`` meanwhile."""
    wait = OUT_POLL_S
    if deadline is not None:
        wait = min(wait, deadline - time.monotonic())
        if wait <= 0:
            raise GenerationTimeout("the generation ran past its timeout_s")
    try:
        return out.get(timeout=wait)
    except queue.Empty:
        if closed:
            raise PipelineClosedError("the pipeline was closed during this generation") from None
        return None
