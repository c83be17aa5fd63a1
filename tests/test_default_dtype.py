"""The default dtype depends on the device (issue 13): bf16 on CUDA, fp32 elsewhere. The choice
is a pure function of the device string, so it is tested here without a GPU, and so is the way
``load_stages``, ``FastPipeline.from_pretrained`` and the CLI reach it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipespec_fast import FastPipeline, cli, loading
from pipespec_fast.loading import default_dtype


@pytest.mark.parametrize("device, want", [
    ("cuda", torch.bfloat16), ("cuda:1", torch.bfloat16), (torch.device("cuda", 0),
                                                            torch.bfloat16),
    ("cpu", torch.float32), (torch.device("cpu"), torch.float32), ("meta", torch.float32),
])
def test_default_dtype_is_bf16_on_cuda_only(device, want):
    assert default_dtype(device) is want


def _fake_stages(monkeypatch, tmp_path, n):
    seen = []

    def fake_from_pretrained(path, dtype, device, max_len, name):
        seen.append((str(device), dtype))
        return SimpleNamespace(vocab_size=50, max_len=max_len, device=torch.device(device),
                               name=name)

    monkeypatch.setattr(loading.LlamaStage, "from_pretrained", fake_from_pretrained)
    paths = [tmp_path / f"m{i}" for i in range(n)]
    for p in paths:
        p.mkdir()
    return paths, seen


def test_load_stages_picks_each_stage_default_from_its_own_device(monkeypatch, tmp_path):
    paths, seen = _fake_stages(monkeypatch, tmp_path, 2)
    loading.load_stages(paths, devices=["cpu", "cuda:0"], max_len=8)
    assert seen == [("cpu", torch.float32), ("cuda:0", torch.bfloat16)]
    seen.clear()
    loading.load_stages(paths, device="cuda", dtype=torch.float16, max_len=8)  # asked: kept
    assert seen == [("cuda", torch.float16)] * 2


def test_cli_passes_no_dtype_unless_asked(monkeypatch):
    seen = {}

    def record(cls, *a, **k):
        seen.update(k)
        raise KeyboardInterrupt  # stop before any model loads

    monkeypatch.setattr(FastPipeline, "from_default", classmethod(record))
    cli.main(["generate", "--prompt", "hi"])
    assert seen["dtype"] is None  # from_pretrained -> load_stages: default_dtype(device)
    cli.main(["generate", "--prompt", "hi", "--dtype", "float16"])
    assert seen["dtype"] is torch.float16


def test_from_pretrained_default_reaches_load_stages_as_none(monkeypatch, tmp_path):
    seen = {}

    def fake_load_stages(paths, device, dtype, devices, max_len, ngram, ngram_store=None):
        seen.update(device=device, dtype=dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_stages", fake_load_stages)
    with pytest.raises(KeyboardInterrupt):
        FastPipeline.from_pretrained([str(tmp_path)], device="cuda")
    assert seen == {"device": "cuda", "dtype": None}
