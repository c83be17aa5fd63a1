"""The command line: one-line errors, exit code 2 for usage mistakes (found before any model
loads), 1 for failures while running, 130 on Ctrl-C, tracebacks only with --debug."""

from __future__ import annotations

import os

import pytest

from pipespec_fast import FastPipeline, cli


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(FastPipeline, "from_default", classmethod(refuse))
    monkeypatch.setattr(FastPipeline, "from_pretrained", classmethod(refuse))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pipespec-fast: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1e-45"], "--temperature"),
    (["--top-p", "3"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**40)], "--seed"),
    (["--max-len", "-5"], "--max-len"),
    (["--device", "tpu:0"], "--device"),
    (["--ngram"], "--ngram"),
    (["--compute", "fp8"], "--compute"),
    (["--tree-budget", "-1"], "--tree-budget must be an integer in [0, 48]"),
    (["--tree-budget", "49"], "--tree-budget"),
    (["--models", ".", "--tree-budget", "4"], "--tree-budget with --models needs --ngram"),
    (["--models", ".", "--ngram-store", "none"], "--ngram-store with --models needs --ngram"),
    (["--ngram-store", "/nonexistent-store"], "--ngram-store: /nonexistent-store: no store.json"),
    (["--models", ".", "--draft"], "--draft applies to the default hierarchy, not to --models"),
    (["--models", ".", "--no-draft"], "--no-draft applies to the default hierarchy"),
    (["--draft", "--no-draft"], "--draft and --no-draft: give one of them"),
])
def test_bad_arguments_exit_2_before_any_model_loads(args, needle, capsys, no_model_load):
    assert cli.main(["generate", "--prompt", "hi", *args]) == cli.EXIT_USAGE
    _one_line_error(capsys, needle)


def test_compute_mode_reaches_the_pipeline(monkeypatch) -> None:
    seen = {}

    def record(cls, *a, **k):
        seen.update(k)
        raise KeyboardInterrupt  # stop before any model loads

    monkeypatch.setattr(FastPipeline, "from_default", classmethod(record))
    assert cli.main(["generate", "--prompt", "hi", "--compute", "int8"]) == 130
    assert seen["compute"] == "int8"
    seen.clear()
    cli.main(["generate", "--prompt", "hi", "--compute", "exact"])
    assert seen["compute"] == "exact"
    seen.clear()
    cli.main(["generate", "--prompt", "hi"])  # the pipeline's default: int8 where packed
    assert seen["compute"] is None
    assert seen["draft"] is None  # from_default's choice by the machine's cores
    for flag, draft in (("--draft", True), ("--no-draft", False)):
        seen.clear()
        cli.main(["generate", "--prompt", "hi", flag])
        assert seen["draft"] is draft
    assert seen["tree_budget"] == 0
    cli.main(["generate", "--prompt", "hi", "--tree-budget", "12"])
    assert seen["tree_budget"] == 12
    assert "ngram_store" not in seen  # the default hierarchy's own store
    cli.main(["generate", "--prompt", "hi", "--ngram-store", "none"])
    assert seen["ngram_store"] is None
    from pipespec_fast.models.defaults import NGRAM_STORE_DIR

    cli.main(["generate", "--prompt", "hi", "--ngram-store", str(NGRAM_STORE_DIR)])
    assert seen["ngram_store"] == str(NGRAM_STORE_DIR)


def test_cuda_device_without_cuda_is_a_usage_error(monkeypatch, capsys, no_model_load):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["generate", "--prompt", "hi", "--device", "cuda"]) == cli.EXIT_USAGE
    _one_line_error(capsys, "--device", "CUDA is not available")


def test_model_folder_problems_are_named(tmp_path, capsys, no_model_load):
    missing = tmp_path / "nope"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, what in [(missing, "no such folder"), (a_file, "not a folder"),
                       (empty, "no config.json"), (loop, str(loop))]:
        assert cli.main(["generate", "--models", str(path), "--prompt", "hi"]) == cli.EXIT_USAGE
        _one_line_error(capsys, str(path), what)


def test_convert_of_a_missing_file_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "x.gguf"), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "x.gguf")


def _failing_generate(args):
    raise RuntimeError("stage 1 (draft) failed: boom\nsecond line")


def test_runtime_failure_exits_1_with_one_line_and_debug_shows_the_traceback(monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(cli, "_generate", _failing_generate)
    assert cli.main(["generate", "--prompt", "hi"]) == cli.EXIT_RUNTIME
    _one_line_error(capsys, "RuntimeError", "boom")
    assert cli.main(["--debug", "generate", "--prompt", "hi"]) == cli.EXIT_RUNTIME
    err = capsys.readouterr().err
    assert "Traceback" in err and "_failing_generate" in err


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_generate", interrupted)
    assert cli.main(["generate", "--prompt", "hi"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
