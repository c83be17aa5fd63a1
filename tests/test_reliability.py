"""The engine's promises under bad input and faults (docs/RELIABILITY.md): lossless output or
a clear error naming the culprit, no code run from a model folder, bounded generations."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from test_pipeline import PROMPT, stages_for, target_greedy
from tiny import write_tiny_checkpoint

from pipespec_fast import FastPipeline, StageError
from pipespec_fast.errors import GenerationTimeout, NonFiniteLogitsError, PipelineClosedError
from pipespec_fast.loading import load_tokenizer


class Faulty:
    """Wraps a stage; from its ``after``-th forward on it returns ``bad`` logits (NaN, inf) or
    blocks until ``release`` is set (a hung stage)."""

    def __init__(self, inner, after: int, bad: float | None = float("nan"),
                 hang: threading.Event | None = None, name: str = "faulty") -> None:
        self.inner, self.after, self.bad, self.hang, self.calls = inner, after, bad, hang, 0
        self.name, self.vocab_size, self.max_len = name, inner.vocab_size, inner.max_len

    cache_len = property(lambda self: self.inner.cache_len)
    device = property(lambda self: self.inner.device)
    capabilities = property(lambda self: self.inner.capabilities)

    def forward(self, tokens, parents=None, last_n=None):
        self.calls += 1
        out = self.inner.forward(tokens, parents, last_n)
        if self.calls > self.after:
            if self.hang is not None:
                self.hang.wait(30)
            elif self.bad is not None:
                out = out.clone()
                out[:, 3] = self.bad
        return out

    def rollback(self, length):
        self.inner.rollback(length)

    def keep_path(self, *a, **kw):
        self.inner.keep_path(*a, **kw)


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_draft_logits_raise_naming_the_draft(mode, temperature, bad):
    stages = stages_for(2, seed=4)
    stages[0] = Faulty(stages[0], after=3, bad=bad, name="draft")
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False)
    with pytest.raises(StageError, match=r"stage 0 \(draft\).*non-finite") as info:
        pipe.generate(PROMPT, 40, temperature=temperature, seed=1, ignore_eos=True)
    assert isinstance(info.value.__cause__, NonFiniteLogitsError)


@pytest.mark.parametrize("mode", ["pipespec", "sync", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_target_logits_raise_naming_the_target(mode, temperature):
    stages = stages_for(2, seed=5)
    stages[1] = Faulty(stages[1], after=2, name="target")
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False)
    with pytest.raises(StageError, match=r"stage \d \(target\).*non-finite"):
        pipe.generate(PROMPT, 30, temperature=temperature, seed=1, ignore_eos=True)


def test_a_row_of_minus_inf_is_refused_but_partial_minus_inf_rows_are_fine():
    # an n-gram's rows are -inf except at its proposal: fine; a row of -inf only is not
    stages = stages_for(1, seed=6)
    stages[0] = Faulty(stages[0], after=1, bad=float("-inf"))
    res = FastPipeline(stages).generate(PROMPT, 5, ignore_eos=True)  # one column at -inf
    assert len(res.token_ids) == 5

    class AllMinusInf(Faulty):
        def forward(self, tokens, parents=None, last_n=None):
            return torch.full_like(self.inner.forward(tokens, parents, last_n), float("-inf"))

    with pytest.raises(StageError, match="non-finite"):
        FastPipeline([AllMinusInf(stages_for(1)[0], 0)]).generate(PROMPT, 3)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e-45), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=True), "top_k"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2**31), "seed"),
    (dict(seed=True), "seed"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(stop=[]), "stop"),
])
def test_extreme_arguments_are_refused_naming_them(kwargs, needle):
    pipe = FastPipeline(stages_for(1))
    n = kwargs.pop("max_new_tokens", 4)
    with pytest.raises(ValueError, match=needle):
        pipe.generate(PROMPT, n, **kwargs)


@pytest.mark.parametrize("prompt", [b"\x01\x05", [1.0, 5.0], [True, 5], bytearray(b"ab"), 7])
def test_prompts_that_are_not_token_ids_are_refused(prompt):
    with pytest.raises(ValueError, match="prompt"):
        FastPipeline(stages_for(1)).generate(prompt, 4)


def test_stages_in_the_wrong_order_are_refused_unless_allowed():
    from tiny import family

    small = family(2, seed=1, n_layers=1)[0]
    big = family(2, seed=1, n_layers=3)[1]
    from pipespec_fast import LlamaStage

    draft, target = LlamaStage(small, name="small"), LlamaStage(big, name="big")
    with pytest.raises(ValueError, match=r"stage 0 'big'.*larger than stage 1 'small'"):
        FastPipeline([target, draft])
    FastPipeline([target, draft], check_order=False)  # an explicit override
    FastPipeline([draft, target])


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_close_during_a_generation_raises_a_clear_error(mode):
    stages = stages_for(2, seed=7)
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False)
    it = pipe._run(PROMPT, 200, ignore_eos=True)  # generate() step by step (no tokenizer)
    next(it)
    closer = threading.Timer(0.05, pipe.close)
    closer.start()
    with pytest.raises(PipelineClosedError):
        for _ in it:
            time.sleep(0.01)
    closer.join()
    with pytest.raises(PipelineClosedError):
        pipe.generate(PROMPT, 4)


def test_a_hung_stage_is_bounded_by_timeout_s():
    stages = stages_for(2, seed=8)
    release = threading.Event()
    stages[0] = Faulty(stages[0], after=2, bad=None, hang=release, name="stuck")
    pipe = FastPipeline(stages, adaptive_windows=False)
    t = time.monotonic()
    try:
        with pytest.raises(GenerationTimeout, match="timeout_s"):
            pipe.generate(PROMPT, 60, ignore_eos=True, timeout_s=0.5)
        assert time.monotonic() - t < 10  # the hang (30 s) did not hold the caller
        # the stuck worker still holds its stage: the pipeline refuses further work
        with pytest.raises(PipelineClosedError):
            pipe.generate(PROMPT, 4)
    finally:
        release.set()


def test_a_generation_within_its_timeout_is_unchanged():
    stages = stages_for(2, seed=9)
    want = target_greedy(stages[-1], PROMPT, 20)
    res = FastPipeline(stages).generate(PROMPT, 20, ignore_eos=True, timeout_s=600)
    assert res.token_ids == want


def test_tokenizer_code_in_a_model_folder_is_never_run(tmp_path):
    from tiny import family

    write_tiny_checkpoint(tmp_path, family(1)[0], [f"w{i}" for i in range(64)])
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    try:
        load_tokenizer(tmp_path)
    except ValueError as e:  # refused, with one line naming the folder
        assert str(tmp_path) in str(e) and "\n" not in str(e)
    assert not marker.exists()


def test_a_corrupt_tokenizer_file_is_named(tmp_path):
    from tiny import family

    write_tiny_checkpoint(tmp_path, family(1)[0], [f"w{i}" for i in range(64)])
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_stop_string_keeps_only_the_tokens_whose_text_is_returned(tmp_path):
    from tiny import family

    words = [f"w{i}" for i in range(64)]
    write_tiny_checkpoint(tmp_path, family(1, seed=3)[0], words)
    pipe = FastPipeline.from_pretrained([tmp_path])
    full = pipe.generate(PROMPT, 12, ignore_eos=True)
    decode = lambda ids: pipe.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # a stop string that starts inside the fourth token's text ("w12 w3" -> "2 w3")
    start = len(decode(full.token_ids[:3])) + 2
    stop = full.text[start:start + 4]
    res = pipe.generate(PROMPT, 12, ignore_eos=True, stop=stop)
    cut = full.text.find(stop)
    assert res.finish_reason == "stop" and res.text == full.text[:cut]
    kept = res.token_ids
    assert kept == full.token_ids[:len(kept)]
    assert res.text.startswith(decode(kept))  # every returned token's text is in the text
    assert len(decode(full.token_ids[:len(kept) + 1])) > cut  # and the next one's is not


def test_a_pipeline_config_cannot_silently_change_process_wide_paths():
    from pipespec_fast import config

    cfg = config.current()
    FastPipeline(stages_for(1), config=cfg.replace(idle_drafters=False))  # per pipeline: fine
    with pytest.raises(ValueError, match=r"config: fused.*process-wide"):
        FastPipeline(stages_for(1), config=cfg.replace(fused=not cfg.fused))
