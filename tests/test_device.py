"""``StageDevice`` on CUDA, checked by construction on a CPU machine: the event that ends a
verify step's one host synchronisation is recorded on the stream the result copy was queued
on (in sync/ar modes the caller's current stream, not the stage's own)."""

from __future__ import annotations

import torch

from pipespec_fast.decoding.device import StageDevice


class _Recorder:
    def __init__(self, log):
        self.log = log

    def record(self, stream):
        self.log.append(("record", stream))

    def synchronize(self):
        self.log.append(("synchronize", None))


class _Pinned:
    def __init__(self, log):
        self.log, self.values = log, [0, 0, 0]

    def copy_(self, src, non_blocking=False):
        self.log.append(("copy", _current[0]))
        self.values = [int(v) for v in src.tolist()]

    def tolist(self):
        return list(self.values)


_current = ["caller-stream"]


def _fake_cuda_device(monkeypatch) -> tuple[StageDevice, list]:
    log: list = []
    dev = StageDevice(torch.device("cpu"))
    dev.cuda, dev.device, dev.stream = True, torch.device("cpu"), "stage-stream"
    dev._event, dev._pinned = _Recorder(log), _Pinned(log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _current[0])
    return dev, log


def test_the_event_is_recorded_on_the_stream_of_the_copy(monkeypatch):
    dev, log = _fake_cuda_device(monkeypatch)
    for current in ("caller-stream", "stage-stream"):  # sync/ar mode; a PipeSpec worker
        _current[0] = current
        log.clear()
        got = dev.to_host(torch.tensor(2), torch.tensor(7), torch.tensor(True))
        assert got == (2, 7, True)
        assert log == [("copy", current), ("record", current), ("synchronize", None)]


def test_draft_rows_are_marked_used_on_the_current_stream(monkeypatch):
    dev, _ = _fake_cuda_device(monkeypatch)
    marked = []

    class Row(torch.Tensor):
        def record_stream(self, stream):
            marked.append(stream)

    rows = [torch.zeros(4).as_subclass(Row) for _ in range(2)]
    _current[0] = "caller-stream"
    out = dev.rows_here(rows)
    assert out.shape == (2, 4) and marked == ["caller-stream", "caller-stream"]
