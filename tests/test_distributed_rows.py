"""The row routes of a distributed pipeline (``pipespec/payload.py``), without processes: which
route a link takes for which devices and NCCL availability, the groups every rank makes (the
same, in the same order), the bounded wait on NCCL transfers, and a link sending and
receiving a Chunk's rows on its route right after the control part.

The routes run for real in ``tests/test_distributed.py`` (``PIPESPEC_DIST_ROWS=split``: rows
on a gloo group of their own, standing in for NCCL). The NCCL route itself needs two GPUs:
``docs/ARCHITECTURE.md`` (distributed placement) has the command that confirms it."""

from datetime import timedelta

import pytest
import torch

from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.pipespec import payload, transport, wire
from pipespec_fast.pipespec.messages import Chunk
from pipespec_fast.pipespec.payload import (
    GroupLink,
    NcclLink,
    PayloadLink,
    RankDevice,
    bounded_wait,
    choose,
    make_routes,
)

CPU = RankDevice(False, "", False)
GPU_A = RankDevice(True, "GPU-a", True)
GPU_B = RankDevice(True, "GPU-b", True)
GPU_B_NO_NCCL = RankDevice(True, "GPU-b", False)


@pytest.mark.parametrize("a,b,auto,split", [
    (CPU, CPU, "inline", "split"),
    (GPU_A, GPU_B, "nccl", "nccl"),
    (GPU_B, GPU_A, "nccl", "nccl"),
    (GPU_A, GPU_A, "inline", "split"),  # one GPU for both ranks: NCCL refuses it
    (GPU_A, CPU, "inline", "split"),
    (CPU, GPU_B, "inline", "split"),
    (GPU_A, GPU_B_NO_NCCL, "inline", "split"),
    (GPU_B_NO_NCCL, GPU_A, "inline", "split"),
])
def test_a_link_takes_nccl_only_between_two_gpus_with_nccl(a, b, auto, split):
    assert choose("auto", a, b) == auto
    assert choose("split", a, b) == split
    assert choose("gloo", a, b) == "inline"


def test_an_unknown_row_mode_is_refused():
    with pytest.raises(ValueError, match="one of auto, gloo, split"):
        choose("nccl", GPU_A, GPU_B)


def test_describe_a_cpu_rank():
    assert payload.describe("cpu", "split") == RankDevice(False, "", False, "split")


class _FakeDist:
    """``new_group`` recorded (ranks, backend), each group a distinct object."""

    def __init__(self):
        self.calls = []

    def new_group(self, ranks, timeout, backend):
        self.calls.append((tuple(ranks), backend))
        return f"group{len(self.calls)}"


def _routes(monkeypatch, rank, infos, device="cpu"):
    fake, warm = _FakeDist(), []
    monkeypatch.setattr(payload.dist, "new_group", fake.new_group)
    for cls in (PayloadLink, NcclLink):
        monkeypatch.setattr(cls, "warm_up",
                            lambda self, r, low, t: warm.append((r, low, self.route)))
    control = [f"control{low}" for low in range(len(infos) - 1)]
    links = make_routes(rank, len(infos), control, infos, device, 60.0)
    return links, fake.calls, warm


@pytest.mark.parametrize("mode,calls", [
    ("auto", [((0, 1), "nccl")]),
    ("split", [((0, 1), "nccl"), ((1, 2), "gloo")]),
    ("gloo", []),
])
def test_every_rank_makes_the_same_groups_in_the_same_order(monkeypatch, mode, calls):
    """Ranks 0 and 1 on two GPUs, rank 2 on the CPU: the groups are made by every rank (a
    collective), each rank keeps the routes of its own links, and connects them in link
    order (rank 1 receives on link 0 before it sends on link 1: no cycle)."""
    infos = [RankDevice(True, "GPU-a", True, mode), RankDevice(True, "GPU-b", True, mode),
             RankDevice(False, "", False, mode)]
    per_rank = [_routes(monkeypatch, r, infos, f"cuda:{min(r, 1)}") for r in range(3)]
    for _, made, _ in per_rank:
        assert made == calls
    kinds = [[type(x).__name__ if x is not None else None for x in links]
             for links, _, _ in per_rank]
    second = {"auto": "PayloadLink", "split": "GroupLink", "gloo": "PayloadLink"}[mode]
    first = "PayloadLink" if mode == "gloo" else "NcclLink"
    assert kinds == [[first, None], [first, second], [None, second]]
    links1, _, warm1 = per_rank[1]
    if mode != "gloo":
        assert links1[0].device == torch.device("cuda:1")
        assert links1[0].group == "group1"
    assert all(x.group == f"control{low}" for low, x in enumerate(links1)
               if x.route == "inline")  # rows with the rest: on the link's own control group
    assert warm1 == [(1, low, x.route) for low, x in enumerate(links1) if x.route != "inline"]


def test_ranks_given_different_row_modes_are_refused(monkeypatch):
    infos = [RankDevice(False, "", False, "auto"), RankDevice(False, "", False, "split")]
    with pytest.raises(ValueError, match=r"different PIPESPEC_DIST_ROWS \(auto, split"):
        _routes(monkeypatch, 0, infos)


# ----------------------------------------------------------------------------- bounded wait


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s

    def __call__(self):
        return self.now


class _Work:
    """An NCCL work that completes after ``polls`` looks (never: ``None``)."""

    def __init__(self, polls, fail=False):
        self.polls, self.fail, self.waits = polls, fail, []

    def is_completed(self):
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0

    def wait(self, timeout):
        self.waits.append(timeout)
        if self.fail:
            raise RuntimeError("DistBackendError: NCCL communicator was aborted")


def test_bounded_wait_polls_with_growing_sleeps_then_waits_once():
    clock, work = _Clock(), _Work(polls=10)
    bounded_wait(work, 3.0, clock.sleep, clock)
    assert clock.sleeps == [2e-5 * 2 ** i for i in range(6)] + [1e-3] * 4
    assert len(work.waits) == 1 and work.waits[0] <= timedelta(seconds=3)


def test_bounded_wait_gives_up_at_the_timeout():
    clock, work = _Clock(), _Work(polls=None)
    with pytest.raises(RuntimeError, match="not done after 3 s"):
        bounded_wait(work, 3.0, clock.sleep, clock)
    assert 3.0 <= clock.now < 3.0 + 1e-9
    assert work.waits == [timedelta(milliseconds=1)]  # torch's own timeout: aborts, raises


def test_bounded_wait_raises_the_transfers_error():
    clock, work = _Clock(), _Work(polls=None, fail=True)
    with pytest.raises(RuntimeError, match="aborted"):
        bounded_wait(work, 0.5, clock.sleep, clock)


# ----------------------------------------------------------------------------- links and routes


class _Route(PayloadLink):
    """A row route recording what it sends and waits for, and handing out given rows."""

    route = "split"

    def __init__(self, rows=()):
        super().__init__("rows-group")
        self.out, self.waited, self.rows = [], [], list(rows)

    def isend(self, t, peer):
        self.out.append((t, peer))
        return ("row-work", len(self.out))

    def wait(self, work, timeout_s):
        self.waited.append((work, timeout_s))

    def recv(self, shape, dtype, peer, timeout_s):
        row = self.rows.pop(0)
        assert (tuple(row.shape), row.dtype, peer) == (shape, dtype, 0)
        return row


class _ControlWork:
    def __init__(self, log):
        self.log = log

    def wait(self, timeout):
        self.log.append(("wait", timeout))


def _chunk():
    rows = torch.softmax(torch.randn(2, 7, dtype=torch.float32), -1)
    return Chunk(4, TokenSpan([3, 5, 6], [None, rows[0], rows[1]], [True, True, False])), rows


def test_a_link_sends_a_chunks_rows_on_its_route_after_the_control_part(monkeypatch):
    log = []
    monkeypatch.setattr(transport.dist, "isend", lambda t, peer, group: (
        log.append((t, peer, group)) or _ControlWork(log)))
    route = _Route()
    link = transport.DistLink(1, "1 (m1) on rank 1", "control", 2.5, rows=route)
    msg, rows = _chunk()
    link.put(msg)
    control, _ = wire.encode(msg)
    assert [(t.tolist(), p, g) for t, p, g in log] == [(t.tolist(), 1, "control")
                                                      for t in control]
    assert [p for _, p in route.out] == [1, 1]
    assert all(torch.equal(t, r) for (t, _), r in zip(route.out, rows, strict=True))
    link.flush()  # each transfer waited for on its own path, bounded
    assert log[2:] == [("wait", timedelta(seconds=2.5))] * 2
    assert route.waited == [(("row-work", 1), 2.5), (("row-work", 2), 2.5)]


def test_a_receiver_takes_the_rows_its_header_announces_from_the_route(monkeypatch):
    msg, rows = _chunk()
    control, _ = wire.encode(msg)
    incoming = [*control, *wire.encode(wire.END)[0]]

    class _Recv:
        def __init__(self, t):
            t.copy_(incoming.pop(0))

        def wait(self, timeout):
            pass

    monkeypatch.setattr(transport.dist, "irecv", lambda t, peer, group: _Recv(t))
    got, ended = [], []
    rows = list(rows)
    route = _Route(rows=list(rows))
    transport.Receiver(0, "0 (m0) on rank 0", "control", 2.0, got.append, ended.append,
                       rows=route)._main()
    assert ended == [wire.END] and not incoming and not route.rows
    (chunk,) = got
    assert chunk.start == 4 and chunk.span.tokens == [3, 5, 6]
    assert chunk.span.rows[0] is None
    assert chunk.span.rows[1] is rows[0] and chunk.span.rows[2] is rows[1]


def test_nccl_rows_are_sent_from_where_they_are():
    link = NcclLink("nccl-group", torch.device("cuda:1"))
    row = torch.arange(6.0).reshape(2, 3)[1]
    assert link.outgoing(row).data_ptr() == row.data_ptr()  # no copy, no host
    host = GroupLink("rows-group")
    assert host.outgoing(row).device == torch.device("cpu") and host.route == "split"


# ----------------------------------------------------------------------------- devices, CLI


@pytest.mark.parametrize("rank,device,want", [
    (0, "cuda", "cuda:0"), (1, "cuda", "cuda:1"), (3, "cuda", "cuda:0"),  # 3rd on host a: 2 % 2
    (2, "cuda", "cuda:0"),  # the first rank on host b
    (1, "cuda:1", "cuda:1"), (3, "cpu", "cpu"),  # as given
])
def test_an_unindexed_cuda_device_is_each_ranks_own_gpu(monkeypatch, rank, device, want):
    from pipespec_fast.pipespec import placement

    def gather(out, obj):
        out[:] = ["a", "a", "b", "a"]

    monkeypatch.setattr(placement.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(placement.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(placement.dist, "all_gather_object", gather)
    monkeypatch.setattr(placement.torch.cuda, "device_count", lambda: 2)
    assert torch.device(placement.rank_device(device)) == torch.device(want)


@pytest.mark.parametrize("rank,drafter", [(0, True), (1, False), (2, True)])
def test_the_n_gram_drafter_stays_on_the_cpu_on_a_gpu_rank(rank, drafter):
    """Ranks 0 (inline) and 2 (the target's skip-level copy) of 3 get the drafter, on the CPU
    although their model is on a GPU (as ``loading.load_stages`` does in one process)."""
    from types import SimpleNamespace

    from pipespec_fast.pipespec.placement import with_drafter
    from pipespec_fast.stages import NGramStage

    model = SimpleNamespace(vocab_size=50, max_len=96, device=torch.device("cuda", rank))
    stages = with_drafter(model, rank, 3, ngram=True)
    assert stages[-1] is model and len(stages) == 1 + drafter
    if drafter:
        assert isinstance(stages[0], NGramStage)
        assert stages[0].device == torch.device("cpu")
        assert (stages[0].vocab_size, stages[0].max_len) == (50, 96)
        from pipespec_fast.stages.ngram_store import NGramStore

        store = NGramStore([[1, 2, 3]], 50)
        assert with_drafter(model, rank, 3, ngram=True, store=store)[0].store is store
    assert with_drafter(model, rank, 3, ngram=False) == [model]


@pytest.mark.parametrize("raw,want", [
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
     "by peer [127.0.0.1]:4520. This is typically caused by a remote worker crashing. Check "
     "the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f",
     "Connection closed by peer [127.0.0.1]:4520"),
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
     "waiting 3000ms for recv operation to complete", "Timed out waiting 3000ms for recv "
     "operation to complete"),
    ("Application timeout caused pair closure", "Application timeout caused pair closure"),
    ("first line. Second sentence\nmore", "first line. Second sentence"),  # not gloo's: kept
    ("", "RuntimeError"),
])
def test_link_errors_lose_gloos_decoration(raw, want):
    assert transport.link_error_text(RuntimeError(raw)) == want


@pytest.mark.parametrize("labels,inline,want", [
    (("0 (m0)", "1 (m1)", "2 (m2)"), False, "m0 on rank 0 -> m1 on rank 1 -> m2 on rank 2"),
    (("0 (ngram)", "1 (draft (v2))", "2 (target)"), True,
     "ngram (inline) -> draft (v2) on rank 0 -> target on rank 1"),
])
def test_the_chain_names_each_stages_rank(labels, inline, want):
    from pipespec_fast.pipespec.placement import Placement

    p = Placement(0, len(labels) - inline, None, labels, inline, 64, 10, (1,))
    assert p.chain() == want


def test_the_cli_summary_names_a_route_of_its_own():
    from types import SimpleNamespace

    from pipespec_fast.cli import _rows_note

    assert _rows_note(SimpleNamespace(routes=(None, "nccl"))) == ", rows: nccl"
    assert _rows_note(SimpleNamespace(routes=("split",))) == ", rows: split"
    assert _rows_note(SimpleNamespace(routes=(None, "inline"))) == ""
    assert _rows_note(SimpleNamespace(routes=())) == ""
