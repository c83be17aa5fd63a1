"""How a PipeSpec worker reaches its neighbours: the transport.

A worker sends to a neighbour with ``neighbour.inbox.put(msg)`` and reads its own ``inbox``
(``worker.py``). Within one process the neighbour *is* the other worker and its inbox a
``queue.SimpleQueue``: the default path, untouched. Across processes the neighbour is a
:class:`RemotePeer`, whose ``inbox`` is a :class:`DistLink` sending ``torch.distributed``
point-to-point messages (``wire.py``) to the neighbour's rank; a :class:`Receiver` thread per
neighbour puts what arrives into the local worker's inbox, so the workers' code is the same in
both placements.

* Sends are non-blocking (``isend``); at most ``max_in_flight`` tensors per link are
  unfinished, then the sender waits for the oldest: a bound on the sending side only. The
  receiving side is unbounded, as in one process: the receiver thread moves each message
  into the worker's inbox (a ``queue.SimpleQueue``), which the worker drains every step.
* A Chunk's probability rows take the link's row route (``payload.py``): with the rest over
  gloo, or right after it on a group of their own (NCCL between two GPUs).
* A receiver blocks in gloo's receive (no polling), with a timeout: a neighbour silent for
  ``peer_timeout_s`` is declared dead. :class:`Heartbeat` keeps idle links talking (every
  ``heartbeat_s``), so silence means a stuck or vanished process; a crashed one closes its
  sockets and is noticed at once.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from pipespec_fast.pipespec import wire
from pipespec_fast.pipespec.payload import PayloadLink


class LinkError(RuntimeError):
    """A link to a neighbouring rank failed (it crashed, hung, or closed its end)."""


class DistLink:
    """The sending end of one link (this rank -> ``peer``): ``put`` as on a queue. ``rows``:
    the link's row route (default: with the rest, over ``group``)."""

    def __init__(self, peer: int, peer_label: str, group, timeout_s: float,
                 max_in_flight: int = 64, rows: PayloadLink | None = None) -> None:
        self.peer = peer
        self.peer_label = peer_label
        self.group = group
        self.rows = rows if rows is not None else PayloadLink(group)
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.last_sent = time.monotonic()
        self.closed = False  # a terminal message was sent: nothing more goes out
        self._lock = threading.Lock()  # one message's tensors go out together
        self._pending: deque = deque()  # (work, its route, the tensor kept alive until sent)

    def put(self, msg) -> None:
        control, rows = wire.encode(msg)
        rows = [self.rows.outgoing(r) for r in rows]
        with self._lock:
            if self.closed:
                return
            for t in control:
                self._send(None, t)
            for t in rows:  # right after the control part, on the row route
                self._send(self.rows, t)
            self.last_sent = time.monotonic()
            self.closed = isinstance(msg, wire.TERMINAL)

    def _send(self, route: PayloadLink | None, t: torch.Tensor) -> None:
        while len(self._pending) >= self.max_in_flight:
            self._wait_oldest()
        try:
            if route is None:
                work = dist.isend(t, self.peer, group=self.group)
            else:
                work = route.isend(t, self.peer)
        except RuntimeError as e:  # the peer's socket is gone already
            raise self._peer_error(e) from None
        self._pending.append((work, route, t))

    def _wait_oldest(self) -> None:
        work, route, _ = self._pending.popleft()
        try:
            if route is None:
                work.wait(timedelta(seconds=self.timeout_s))
            else:
                route.wait(work, self.timeout_s)
        except RuntimeError as e:
            raise self._peer_error(e) from None

    def _peer_error(self, e: RuntimeError) -> LinkError:
        """A failed send: the neighbour died or stopped answering (the worker's error names
        it, not the worker's own stage)."""
        err = LinkError(f"rank {self.peer} died or stopped answering ({link_error_text(e)})")
        err.pipespec_stage = self.peer_label
        return err

    def flush(self) -> None:
        """Wait until every message sent has left (at most the timeout each)."""
        with self._lock:
            while self._pending:
                self._wait_oldest()

    def try_close(self, msg) -> None:
        """Send a terminal message, if the link still works (best effort: on a failure the
        neighbour may be gone already)."""
        try:
            self.put(msg)
            self.flush()
        except (LinkError, RuntimeError):
            with self._lock:
                self.closed = True
                self._pending.clear()


class RemotePeer:
    """A neighbouring stage in another process, as a worker sees a neighbour (``inbox.put``)."""

    def __init__(self, link: DistLink) -> None:
        self.inbox = link


class Receiver:
    """A thread receiving one link's messages (from ``peer``) until its terminal message.

    ``deliver(msg)`` gets every Chunk / Sync / Wanted, ``control(msg)`` the terminal message
    (Finish, End or Fail), or a ``Fail`` naming ``peer_label`` when the link breaks (the
    neighbour crashed, or sent nothing for ``timeout_s``). Rows come on ``rows``, the link's
    row route (default: with the rest, over ``group``), and are put on ``device``.
    """

    def __init__(self, peer: int, peer_label: str, group, timeout_s: float,
                 deliver: Callable, control: Callable, device: torch.device | None = None,
                 rows: PayloadLink | None = None) -> None:
        self.peer = peer
        self.peer_label = peer_label
        self.group = group
        self.rows = rows if rows is not None else PayloadLink(group)
        self.timeout_s = timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        self.deliver = deliver
        self.control = control
        self.device = device
        self.thread = threading.Thread(target=self._main, name=f"pipespec-recv-{peer}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _recv(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        dist.irecv(t, self.peer, group=self.group).wait(self.timeout)
        return t

    def _main(self) -> None:
        try:
            while True:
                head = self._recv((wire.HEADER,), torch.int64)
                control, rows = wire.payload_shapes(head)
                payload = [self._recv(s, d) for s, d in control]
                got = [self.rows.recv(s, d, self.peer, self.timeout_s) for s, d in rows]
                msg = wire.decode(head, payload, got, self.device)
                if isinstance(msg, wire.TERMINAL):
                    self.control(msg)
                    return
                if not isinstance(msg, wire.Heartbeat):
                    self.deliver(msg)
        except Exception as e:  # the link broke: name the neighbour
            self.control(wire.Fail(self.peer_label, "died or stopped answering (rank "
                                   f"{self.peer}: {link_error_text(e)})"))


class Heartbeat:
    """A thread sending a Heartbeat on each link idle for ``interval_s`` (sleeping between)."""

    def __init__(self, links: list[DistLink], interval_s: float) -> None:
        self.links = links
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="pipespec-heartbeat",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def _main(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            now = time.monotonic()
            for link in self.links:
                if now - link.last_sent >= self.interval_s / 2:
                    try:
                        link.put(wire.HEARTBEAT)
                    except (LinkError, RuntimeError):
                        pass  # its receiver on this side reports the broken link


_GLOO_WHERE = re.compile(r"^\[[^\]\s]+:\d+\]\s*")  # gloo's "[.../pair.cc:553] "


def link_error_text(e: BaseException) -> str:
    """The first line of a link's error, without gloo's decoration: its source location and
    what follows its first sentence (advice written for gloo's own users, and a sign-off),
    so ``[/.../tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4520. This is typically
    caused by ...`` reads ``Connection closed by peer [127.0.0.1]:4520``."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if _GLOO_WHERE.match(line):
        line = _GLOO_WHERE.sub("", line).split(". ")[0].rstrip(".")
    return line or type(e).__name__
