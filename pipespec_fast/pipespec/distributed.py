"""One PipeSpec generation on one rank of a distributed pipeline (``placement.py``): the same
worker as in a threaded pipeline, whose neighbours are remote (``transport.py``).

Every rank calls ``generate`` with the same request (checked when it starts: a collective).
The target's rank hands its verified tokens to its caller as they come; when its caller has
enough, it sends ``Finish(tokens)`` down the chain, each rank passes it on and returns the
same tokens, and every link is closed by one terminal message in each direction (``Finish``
or ``End``), so no receive is left pending for the next generation.

A failure anywhere (a stage raising, a rank dying or falling silent) becomes a ``Fail`` naming
the stage, passed on by every rank, each of which raises :class:`StageError` naming it.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.errors import StageError
from pipespec_fast.pipespec import topology, wire
from pipespec_fast.pipespec.inline import InlineStage
from pipespec_fast.pipespec.messages import WAKE, Emit
from pipespec_fast.pipespec.placement import Placement
from pipespec_fast.pipespec.run import next_output
from pipespec_fast.pipespec.topology import PipeSpecSettings
from pipespec_fast.pipespec.transport import (
    DistLink,
    Heartbeat,
    Receiver,
    RemotePeer,
    link_error_text,
)


class RemoteStageError(RuntimeError):
    """A stage on another rank failed (the message is its error's first line)."""


class DistributedRun:
    """This rank's worker, its links to the neighbouring ranks, and the output loop
    (the interface of ``run.PipeSpecRun``: :meth:`tokens`, :meth:`close`)."""

    def __init__(self, seqrs: list[Sequencer], placement: Placement,
                 settings: PipeSpecSettings, limit: int, matmul_threads: list[int | None],
                 idle: list[bool] | None = None) -> None:
        p = self.p = placement
        self.limit = limit
        self._stop = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self.failure: wire.Fail | None = None
        self.final: list[int] | None = None
        self.started = False
        # why this rank stops early, for the Fail its neighbours get (``interrupted``)
        self.stop_reason = ("its generation was stopped before the target finished "
                            "(abandoned, timed out or closed)")
        j = next(j for j, s in enumerate(seqrs) if s.index == p.stage)
        self.worker = w = topology.worker_for(seqrs[j], p.k, settings, limit,
                                              matmul_threads[j], bool(idle and idle[j]),
                                              self._stop, self._out)
        lowest = [s for s in seqrs if s.index == 0 and s is not seqrs[j]]
        if lowest and p.rank == 0:
            w.inline = InlineStage(lowest[0])
        elif lowest and settings.skip_level_drafts:
            w.skip = InlineStage(lowest[0])  # this rank's own copy: no clone needed
        self.links: dict[int, DistLink] = {}
        self.receivers: list[Receiver] = []
        device = seqrs[j].stage.device
        for r in (p.rank - 1, p.rank + 1):
            if 0 <= r < p.world:
                label = p.label_of_rank(r)
                rows = p.rows_link(r)
                group = p.link_group(r)
                self.links[r] = DistLink(r, label, group, p.peer_timeout_s, rows=rows)
                self.receivers.append(Receiver(r, label, group, p.peer_timeout_s,
                                               w.inbox.put, self._control, device, rows))
        if p.rank > 0:
            w.below = RemotePeer(self.links[p.rank - 1])
        if not p.is_target:
            w.above = RemotePeer(self.links[p.rank + 1])
        self.heartbeat = Heartbeat(list(self.links.values()), p.heartbeat_s)

    def _control(self, msg) -> None:
        """A link's terminal message (from a receiver thread)."""
        if isinstance(msg, wire.Finish):
            self._out.put(msg)
        elif isinstance(msg, wire.Fail):
            self._out.put(Emit([], error=RemoteStageError(msg.message), stage=msg.stage))
            self._stop.set()

    def _handshake(self, prompt: list[int]) -> None:
        """Every rank starts the same request (a collective, bounded by the start timeout)."""
        s = self.worker.s
        key = repr((prompt, self.limit, s.params)).encode()
        mine = torch.tensor([zlib.crc32(key), len(prompt)], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.p.world)]
        try:
            dist.all_gather(every, mine, group=self.p.group, async_op=True).wait(
                timedelta(seconds=self.p.start_timeout_s))
        except RuntimeError as e:
            raise StageError(self.p.label_of_rank(self.p.rank), RuntimeError(
                f"not every rank started this generation ({link_error_text(e)})")) from e
        differ = [r for r, t in enumerate(every) if not torch.equal(t, every[-1])]
        if differ:
            raise ValueError(f"distributed: ranks {differ} were given another prompt or "
                             "sampling settings than the target's rank")

    def tokens(self, prompt: list[int], deadline: float | None = None
               ) -> Iterator[list[int]]:
        """Start this rank's stage on ``prompt``; on the target's rank yield each list of newly
        verified tokens, on the others the target's final tokens once, at the end."""
        self._handshake(prompt)
        self.started = True  # from here on, every link is closed by a terminal message
        for r in self.receivers:
            r.start()
        self.heartbeat.start()
        self.worker.start(prompt)
        while True:
            msg = next_output(self._out, deadline, self.closed)
            if msg is None:
                continue
            if isinstance(msg, wire.Finish):
                self.final = msg.tokens
                yield msg.tokens
                return
            if msg.error is not None:
                stage = msg.stage
                if " on rank " not in stage:  # raised here (a remote one names its rank)
                    stage = f"{stage} on rank {self.p.rank}"
                self.failure = wire.Fail(stage, _first_line(msg.error))
                raise StageError(stage, msg.error) from msg.error
            yield msg.tokens

    def interrupted(self) -> None:
        """This rank's caller got a KeyboardInterrupt (Ctrl-C, or SIGINT from ``torchrun``):
        ``close`` tells the other ranks so, and they raise naming this rank."""
        self.stop_reason = "interrupted (KeyboardInterrupt: Ctrl-C or SIGINT)"

    def set_final(self, tokens: list[int]) -> None:
        """The target's caller has its result: ``close`` sends it down."""
        self.final = list(tokens)

    # long: one ordered shutdown (worker, heartbeats, a terminal message per link, receivers)
    def close(self, join_s: float = 30.0) -> list[str]:
        """Stop this rank's worker and close both links (one terminal message each way);
        returns the names of the threads still running then."""
        if self.closed:
            return []
        self.closed = True
        self._stop.set()
        w = self.worker
        w.inbox.put(WAKE)
        if w.thread is not None:
            w.thread.join(timeout=join_s)
        if not self.started:  # no receiver runs anywhere: nothing to close
            return []
        self.heartbeat.stop()
        p = self.p
        if self.failure is None and self.final is None:
            self.failure = wire.Fail(p.label_of_rank(p.rank), self.stop_reason)
        for r, link in self.links.items():
            if self.failure is not None:
                msg = self.failure
            else:
                msg = wire.Finish(self.final) if r < p.rank else wire.END
            link.try_close(msg)
        end = time.monotonic() + p.peer_timeout_s + 1.0
        for r in self.receivers:
            r.thread.join(timeout=max(0.0, end - time.monotonic()))
        alive = [t for t in (w.thread,) if t is not None and t.is_alive()]
        alive += [r.thread for r in self.receivers if r.thread.is_alive()]
        return [t.name for t in alive]


def _first_line(e: BaseException) -> str:
    """An error as one line for a ``Fail`` (a remote one as it came)."""
    text = str(e) if isinstance(e, RemoteStageError) else f"{type(e).__name__}: {e}"
    return (text.strip().splitlines() or [type(e).__name__])[0]
