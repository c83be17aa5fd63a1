"""One PipeSpec generation: start the workers, hand the target's verified tokens to the
caller as they come, surface a failure at once, and stop every worker at the end."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.pipespec import topology
from pipespec_fast.pipespec.messages import WAKE, Emit
from pipespec_fast.pipespec.topology import PipeSpecSettings

ERROR_WAIT_S = 2.0
OUT_POLL_S = 0.5  # how often a caller waiting for tokens checks that some worker still runs


class StageError(RuntimeError):
    """A stage failed during generation; ``stage`` names it, ``__cause__`` is the original."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"PipeSpec stage {stage} failed: {type(exc).__name__}: {exc}")
        self.stage = stage


class PipeSpecRun:
    """The workers of one generation (``topology.build``) and the output loop over them.

    A worker that raises puts the exception on the output queue and sets the shared stop
    event; :meth:`tokens` raises it as :class:`StageError` naming the stage. :meth:`close`
    (idempotent) stops and joins every worker: the caller calls it when it has enough tokens,
    on a failure, or when a stream is abandoned.
    """

    def __init__(self, seqrs: list[Sequencer], settings: PipeSpecSettings, limit: int,
                 matmul_threads: list[int | None], idle: list[bool] | None = None) -> None:
        self._stop = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.workers = topology.build(seqrs, settings, limit, matmul_threads, idle,
                                      self._stop, self._out)

    def tokens(self, prompt: list[int]) -> Iterator[list[int]]:
        """Start the workers on ``prompt``; yield each list of newly verified target tokens."""
        for w in self.workers:
            w.start(prompt)
        while True:
            try:
                msg: Emit = self._out.get(timeout=OUT_POLL_S)
            except queue.Empty:
                if not any(w.thread.is_alive() for w in self.workers):
                    raise RuntimeError("all PipeSpec workers exited without output") from None
                continue
            if msg.error is not None:
                raise StageError(msg.stage, msg.error) from msg.error
            yield msg.tokens

    def close(self) -> None:
        workers, self.workers = self.workers, []
        if not workers:
            return
        self._stop.set()
        for w in workers:  # wake a worker blocked on its inbox now, not at its next poll
            w.inbox.put(WAKE)
        for w in workers:
            if w.thread is not None:
                w.thread.join(timeout=ERROR_WAIT_S + 30)
