"""How a link's probability rows travel between two neighbouring ranks: its row route, chosen
once per link when the pipeline is built (:func:`make_routes`, a collective).

Headers, token ids and the control messages (Sync, Wanted, Heartbeat, Finish, End, Fail)
always travel over the link's control group (gloo, one per link: ``placement.py``), through
host memory: they are small, and gloo's receives take a timeout, so a silent neighbour is
noticed. Rows (sampling only, in Chunks, so only up a link: rank r -> r + 1) are the large
part of a message, and where both ranks' stages live on CUDA devices, copying them to the
host for gloo costs milliseconds where NCCL moves them device to device in microseconds
(``docs/ARCHITECTURE.md``). So each link has a :class:`PayloadLink`:

* ``PayloadLink``: rows go with the control messages over the control group, copied to the
  host (the CPU path, and the fallback);
* ``GroupLink``: rows on a gloo group of their own (``PIPESPEC_DIST_ROWS=split`` where NCCL
  cannot serve the link): the same split path as NCCL's, testable on a CPU;
* ``NcclLink``: rows on an NCCL group of the link's two ranks, sent from and received into
  the stages' devices.

In every route a Chunk's rows are sent right after its control tensors, and received right
after them (the header announces them), so a link's rows arrive in order. Every receive is
bounded (``timeout_s``); a failure raises, and the transport names the neighbour.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

ROW_MODES = ("auto", "gloo", "split")  # PIPESPEC_DIST_ROWS (config.py)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class RankDevice:
    """What choosing a link's route needs to know of one of its ranks (gathered at start-up).

    ``gpu``: the identity of its stage's GPU (its UUID, or host and index), so two ranks on
    one GPU are told apart from two on two GPUs (NCCL refuses two ranks on one GPU);
    ``nccl``: this process can use NCCL (torch built with it, CUDA available); ``mode``: its
    ``PIPESPEC_DIST_ROWS``."""

    cuda: bool
    gpu: str
    nccl: bool
    mode: str = "auto"


def describe(device, mode: str = "auto") -> RankDevice:
    """This rank's :class:`RankDevice` for its stage's ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return RankDevice(False, "", False, mode)
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    gpu = str(uuid) if uuid is not None else f"{socket.gethostname()}/cuda:{index}"
    return RankDevice(True, gpu, dist.is_nccl_available(), mode)


def choose(mode: str, a: RankDevice, b: RankDevice) -> str:
    """The route of the link between ranks ``a`` and ``b``: ``"nccl"`` (both stages on CUDA,
    on two GPUs, both with NCCL), else ``"split"`` (a gloo group of the rows' own) when
    ``mode`` asks for it, else ``"inline"`` (with the control messages). ``mode="gloo"``:
    always inline."""
    if mode not in ROW_MODES:
        raise ValueError(f"row route mode: expected one of {', '.join(ROW_MODES)}, got {mode!r}")
    if mode == "gloo":
        return "inline"
    if a.cuda and b.cuda and a.nccl and b.nccl and a.gpu != b.gpu:
        return "nccl"
    return "split" if mode == "split" else "inline"


class PayloadLink:
    """Rows over ``group`` through host memory (gloo: the control group itself by default).
    Counts the rows it sends and receives (``sent``, ``received``)."""

    route = "inline"

    def __init__(self, group, device: torch.device = CPU) -> None:
        self.group = group
        self.device = device
        self.sent = 0
        self.received = 0

    def outgoing(self, row: torch.Tensor) -> torch.Tensor:
        """``row`` as it is sent: flat, contiguous, on this route's device (a host copy for
        gloo, nothing for NCCL)."""
        return row.reshape(-1).to(self.device).contiguous()

    def isend(self, t: torch.Tensor, peer: int):
        self.sent += 1
        return dist.isend(t, peer, group=self.group)

    def wait(self, work, timeout_s: float) -> None:
        """Wait for one of this route's transfers, at most ``timeout_s`` (raises past it)."""
        work.wait(timedelta(seconds=timeout_s))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, peer: int, timeout_s: float
             ) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.wait(dist.irecv(t, peer, group=self.group), timeout_s)
        self.received += 1
        return t

    def warm_up(self, rank: int, low: int, timeout_s: float) -> None:
        """One element from ``low`` to ``low + 1`` when the pipeline is built, so the route's
        connection (an NCCL communicator is made at its first transfer, collectively) is made
        then, not in the middle of a generation, where it would hold up the link's sends."""
        t = torch.zeros(1, device=self.device)
        if rank == low:
            work = dist.isend(t, low + 1, group=self.group)
        else:
            work = dist.irecv(t, low, group=self.group)
        self.wait(work, timeout_s)


class GroupLink(PayloadLink):
    """Rows on a gloo group of the link's own: the NCCL route's split, on the host."""

    route = "split"


class NcclLink(PayloadLink):
    """Rows on an NCCL group of the link's two ranks, device to device: sent from the stage's
    device (NCCL's stream waits for the sending thread's current stream, the stage's own in a
    worker), received into a tensor on this rank's device."""

    route = "nccl"

    def outgoing(self, row: torch.Tensor) -> torch.Tensor:
        return row.reshape(-1).contiguous()  # a row is on its stage's device: this one

    def wait(self, work, timeout_s: float) -> None:
        bounded_wait(work, timeout_s)

    def recv(self, shape, dtype, peer, timeout_s):
        with torch.cuda.device(self.device):
            return super().recv(shape, dtype, peer, timeout_s)

    def warm_up(self, rank, low, timeout_s):
        with torch.cuda.device(self.device):
            super().warm_up(rank, low, timeout_s)


def bounded_wait(work, timeout_s: float, sleep=time.sleep, clock=time.monotonic) -> None:
    """Wait for an NCCL transfer at most ``timeout_s``, without holding a core.

    An NCCL work completes on its own (its end event), so ``is_completed()`` can be asked,
    sleeping 20 us at first and then longer (up to 1 ms): rows that follow their header come
    in microseconds, and a wait seen at once stays cheap. (``work.wait(timeout)`` blocks the
    same way but sleeps a millisecond at a time; gloo's point-to-point works only complete
    inside ``wait``, so gloo routes use that.) The final ``work.wait`` raises the transfer's
    error if it failed, orders this thread's stream after it, and past the deadline is
    torch's own timeout: it aborts the communicator and raises."""
    deadline = clock() + timeout_s
    pause = 2e-5
    while not work.is_completed():
        left = deadline - clock()
        if left <= 0:
            break
        sleep(min(pause, left))
        pause = min(2 * pause, 1e-3)
    work.wait(timedelta(seconds=max(deadline - clock(), 1e-3)))
    if not work.is_completed():
        raise RuntimeError(f"NCCL transfer not done after {timeout_s:g} s")


def make_routes(rank: int, world: int, control_groups, infos: list[RankDevice],
                device, timeout_s: float) -> tuple[PayloadLink | None, ...]:
    """Every link's row route (link ``l``: ranks ``l`` and ``l + 1``), this rank's own made
    and connected; ``None`` for the links of other ranks. ``control_groups[l]``: link
    ``l``'s control group (the ``inline`` route's). A collective: every rank calls it with
    the same ``infos``, making the same groups in the same order."""
    modes = sorted({i.mode for i in infos})
    if len(modes) > 1:
        raise ValueError(f"distributed: the ranks were given different PIPESPEC_DIST_ROWS "
                         f"({', '.join(i.mode for i in infos)} by rank); set one for all")
    routes = [choose(modes[0], infos[low], infos[low + 1]) for low in range(world - 1)]
    links: list[PayloadLink | None] = []
    for low, route in enumerate(routes):  # every rank makes every group, in link order
        group = control_groups[low]
        if route != "inline":
            group = dist.new_group(ranks=[low, low + 1], timeout=timedelta(seconds=timeout_s),
                                   backend="nccl" if route == "nccl" else "gloo")
        if rank not in (low, low + 1):
            links.append(None)
        elif route == "nccl":
            links.append(NcclLink(group, torch.device(device)))
        else:
            links.append((GroupLink if route == "split" else PayloadLink)(group))
    for low, link in enumerate(links):  # rank l + 1 receives on link l, then sends on l + 1
        if link is not None and link.route != "inline":
            link.warm_up(rank, low, timeout_s)
    return tuple(links)
