"""The round trip of one PipeSpec message pair between two ranks (gloo on loopback): what a
verify round costs in messages when the stages are processes, not threads.

    .venv/bin/python bench/dist_latency.py [--trips 300] [--pin] [--rows auto|gloo|split]
        [--device cuda]

Two processes (torch.multiprocessing, TCP init on loopback) bounce messages; rank 0 reports
the median and 90th percentile round trip, in microseconds, of:

* ``raw``: one ``int64[8]`` header each way with blocking ``dist.send`` / ``dist.recv``
  (gloo's own floor);
* ``chunk_sync``: a Chunk of 4 greedy drafts up and a Sync of 4 tokens down through the
  engine's transport (``pipespec/transport.py``: ``isend``, a receiver thread, the worker's
  queue): what one verify round adds between processes;
* ``chunk_rows``: the same Chunk carrying the 4 drafts' probability rows under sampling
  (``[4, V]`` float32, ``--vocab`` 49152 as SmolLM2's: 786 KB), on the link's row route
  (``pipespec/payload.py``, chosen as a pipeline chooses it, ``--rows``: the report names
  it); rank 1 checks the rows it received are the ones sent, bit for bit (``rows_exact``).

``--device cuda`` puts rank r's rows on ``cuda:r``: on a machine with two GPUs and NCCL, the
rows then travel device to device over NCCL (route ``nccl``); ``--rows gloo`` measures the
same rows through host memory over gloo, for comparison.

And, for comparison, ``queue``: the same pair through two ``queue.SimpleQueue`` between two
threads of one process (the threaded placement's hand-off), and ``tcp``: 64 bytes each way
over a plain TCP socket (``TCP_NODELAY``) between two processes, the loopback's own floor.

``--pin`` gives each rank a core of its own (rank r on CPU r). Without it the scheduler
places them, and on a busy machine they can share a core: a gloo round trip then took 4.0 ms
here (the scheduler's tick at HZ=250), a plain TCP one 13 us (a waiting gloo receive sleeps:
6 ms of CPU in 2 s; which hand-off inside gloo waits for the tick was not pinned down).
"""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stats(us: list[float]) -> dict:
    us = sorted(us)
    return {"median_us": statistics.median(us), "p90_us": us[int(0.9 * (len(us) - 1))]}


def _links(rank: int, inbox: queue.SimpleQueue, device: torch.device, mode: str):
    """Both ends of the link to the other rank, its rows on the route a pipeline would take."""
    import torch.distributed as dist

    from pipespec_fast.pipespec.payload import describe, make_routes
    from pipespec_fast.pipespec.transport import DistLink, Receiver

    group = dist.new_group(backend="gloo")
    infos = [None, None]
    dist.all_gather_object(infos, describe(device, mode), group=group)
    (rows,) = make_routes(rank, 2, [group], infos, device, 60.0)
    peer = 1 - rank
    link = DistLink(peer, f"rank {peer}", group, timeout_s=30.0, rows=rows)
    recv = Receiver(peer, f"rank {peer}", group, 30.0, inbox.put, lambda m: inbox.put(m),
                    device, rows)
    recv.start()
    return link, recv, rows.route


def _chunk(rows: torch.Tensor | None):
    from pipespec_fast.decoding.span import TokenSpan
    from pipespec_fast.pipespec.messages import Chunk

    toks = [11, 12, 13, 14]
    span = TokenSpan(toks, [None] * 4 if rows is None else list(rows), [True] * 4)
    return Chunk(100, span)


# long: one rank's whole protocol (three measurements, then the closing messages)
def _rank(rank: int, port: int, trips: int, vocab: int, out: str, pin: bool, mode: str,
          device_type: str) -> None:
    import os

    import torch.distributed as dist

    if pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    from pipespec_fast.pipespec import wire
    from pipespec_fast.pipespec.messages import Sync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    head = torch.zeros(8, dtype=torch.int64)
    raw = []
    for i in range(trips + 20):
        t = time.perf_counter()
        if rank == 0:
            dist.send(head, 1)
            dist.recv(head, 1)
        else:
            dist.recv(head, 0)
            dist.send(head, 0)
        if i >= 20:
            raw.append((time.perf_counter() - t) * 1e6)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    link, recv, route = _links(rank, inbox, device, mode)
    result = {"raw": _stats(raw), "route": route, "device": str(device)}
    gen = torch.Generator().manual_seed(7)  # the same rows on both ranks: rank 1 checks them
    rows = torch.softmax(torch.randn(4, vocab, generator=gen), -1)
    exact = []
    for name, msg in (("chunk_sync", _chunk(None)), ("chunk_rows", _chunk(rows.to(device)))):
        times = []
        for i in range(trips + 20):
            t = time.perf_counter()
            if rank == 0:
                link.put(msg)
                inbox.get(timeout=30)
            else:
                got = inbox.get(timeout=30)
                link.put(Sync(104, [11, 12, 13, 14]))
                if name == "chunk_rows" and i < 3:
                    exact += [r.device == device and torch.equal(r.cpu(), w)
                              for r, w in zip(got.span.rows, rows, strict=True)]
            if i >= 20:
                times.append((time.perf_counter() - t) * 1e6)
        result[name] = _stats(times)
    link.try_close(wire.END)
    recv.thread.join(timeout=10)
    checked = [None, None]
    dist.all_gather_object(checked, bool(exact) and all(exact))
    result["rows_exact"] = checked[1]
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def thread_queue_round_trip(trips: int) -> dict:
    """The threaded placement's hand-off: two threads, one SimpleQueue each way."""
    up, down = queue.SimpleQueue(), queue.SimpleQueue()
    msg = _chunk(None)

    def above() -> None:
        for _ in range(trips + 20):
            up.get()
            down.put(msg)

    th = threading.Thread(target=above)
    th.start()
    times = []
    for i in range(trips + 20):
        t = time.perf_counter()
        up.put(msg)
        down.get()
        if i >= 20:
            times.append((time.perf_counter() - t) * 1e6)
    th.join()
    return _stats(times)


def _tcp_echo(port: int, trips: int, pin: bool) -> None:
    import os

    if pin:
        os.sched_setaffinity(0, {1 % os.cpu_count()})
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(trips + 20):
            c.sendall(c.recv(64))


def tcp_round_trip(trips: int, pin: bool) -> dict:
    """64 bytes each way over a loopback TCP socket between this process and a child."""
    import multiprocessing as mp
    import os

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        child = mp.get_context("spawn").Process(
            target=_tcp_echo, args=(srv.getsockname()[1], trips, pin))
        child.start()
        conn, _ = srv.accept()
    saved = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {0})
    times = []
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(trips + 20):
            t = time.perf_counter()
            conn.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(conn.recv(64 - got))
            if i >= 20:
                times.append((time.perf_counter() - t) * 1e6)
    os.sched_setaffinity(0, saved)
    child.join(timeout=30)
    return _stats(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trips", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--pin", action="store_true", help="rank r on CPU r only")
    ap.add_argument("--rows", choices=("auto", "gloo", "split"), default="auto",
                    help="the rows' route, as PIPESPEC_DIST_ROWS (pipespec/payload.py)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: rank r's rows on cuda:r (NCCL between two GPUs)")
    ap.add_argument("--out", help="also write the figures (JSON) here")
    args = ap.parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "out.json")
        mp.spawn(_rank, args=(port, args.trips, args.vocab, path, args.pin, args.rows,
                              args.device), nprocs=2)
        result = json.loads(Path(path).read_text())
    result["queue"] = thread_queue_round_trip(args.trips)
    result["tcp"] = tcp_round_trip(args.trips, args.pin)
    result.update(trips=args.trips, vocab=args.vocab, pin=args.pin)
    print(f"rows on {result['device']} (rank 0), route {result['route']}, received bit for bit: "
          f"{result['rows_exact']}")
    for name in ("queue", "tcp", "raw", "chunk_sync", "chunk_rows"):
        r = result[name]
        print(f"{name:10s} round trip: median {r['median_us']:8.1f} us, "
              f"p90 {r['p90_us']:8.1f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
