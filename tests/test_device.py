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
    shape = (64,)

    def __init__(self, log):
        self.log, self.values = log, [0, 0, 0]

    def __getitem__(self, s):
        return self

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


def test_token_uploads_are_pinned_and_non_blocking(monkeypatch):
    """A forward's ids go up from pinned memory without blocking (a pageable
    ``torch.tensor(list, device=cuda)`` waits for the device: a host sync per forward)."""
    dev, _ = _fake_cuda_device(monkeypatch)
    moves = []

    class Pinned(torch.Tensor):
        def to(self, *args, **kwargs):
            moves.append((args, kwargs))
            return torch.Tensor(self)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.as_subclass(Pinned))
    ids = dev.upload([5, 6, 7])
    assert ids.tolist() == [5, 6, 7] and ids.dtype == torch.int64
    assert moves == [((dev.device,), {"non_blocking": True})]


def test_cpu_uploads_are_plain_tensors():
    ids = StageDevice(torch.device("cpu")).upload([1, 2])
    assert ids.tolist() == [1, 2] and ids.dtype == torch.int64 and not ids.is_pinned()


def test_the_sequencer_uploads_through_the_stage_device():
    """No other path builds a forward's ids (a structure check of decoding/sequence.py)."""
    import inspect

    from pipespec_fast.decoding import sequence

    src = inspect.getsource(sequence)
    assert src.count("self.dev.upload(") == 3 and "torch.tensor(" not in src


def test_the_ngram_drafter_stays_on_the_cpu_below_gpu_models(monkeypatch, tmp_path):
    """Model-free stages stay on the CPU (issue 13): below CUDA models the n-gram stage's
    proposals are host lookups, so on the GPU they only cost uploads and host reads."""
    from types import SimpleNamespace

    from pipespec_fast import loading

    def fake_from_pretrained(path, dtype, device, max_len, name):
        return SimpleNamespace(vocab_size=50, max_len=max_len, device=torch.device(device),
                               name=name)

    monkeypatch.setattr(loading.LlamaStage, "from_pretrained", fake_from_pretrained)
    paths = [tmp_path / "draft", tmp_path / "target"]
    for p in paths:
        p.mkdir()
    stages, tok = loading.load_stages(paths, device="cuda:0", max_len=64, ngram=True)
    assert tok is None and [s.device for s in stages] == [
        torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:0")]
    assert stages[0].vocab_size == 50 and stages[0].max_len == 64
