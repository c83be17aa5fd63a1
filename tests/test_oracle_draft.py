"""The oracle draft of the modes benchmark (``bench/oracle_draft.py``): it proposes the
reference token at the hashed share of positions and another token elsewhere, its rows are
one-hot at the right positions whatever the block, and a pipeline with it emits ar's tokens
while the target measures about the chosen acceptance."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_modes as modes  # noqa: E402
from gpu_check_common import DRY  # noqa: E402
from oracle_draft import OracleDraft, is_right, oracle_tokens  # noqa: E402

from pipespec_fast import FastPipeline  # noqa: E402
from pipespec_fast.stages.base import check_stage  # noqa: E402

SZ = dataclasses.replace(DRY, prompt=16, bench_new_tokens=240)


@pytest.mark.parametrize("a", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_tokens_are_the_reference_at_the_hashed_share_and_differ_elsewhere(a):
    ref = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    got = oracle_tokens(ref, a, 50, 3100, seed=3)
    assert got == oracle_tokens(ref, a, 50, 3100, seed=3)  # deterministic
    right = [is_right(p, a, 3) for p in range(3000)]
    assert all((g == r) == ok for g, r, ok in zip(got, ref, right, strict=False))
    assert all(0 <= t < 50 for t in got)
    assert abs(sum(right) / len(right) - a) < 0.03
    if a in (0.0, 1.0):
        assert sum(right) == 3000 * a
    else:  # the seed picks the positions
        assert oracle_tokens(ref, a, 50, 3000, seed=4) != got[:3000]


@pytest.fixture(scope="module")
def pair():
    draft, target, graphs = modes.build(SZ, torch.float32)
    assert graphs is False  # the CPU
    prompt = modes._prompt(SZ)
    ar = FastPipeline([target]).generate(prompt, SZ.bench_new_tokens, ignore_eos=True,
                                         mode="ar").token_ids
    return draft, target, prompt, ar


def test_the_decisive_target_has_a_wide_greedy_margin(pair):
    """What keeps bf16's block-size-dependent rounding from flipping its tokens on a GPU.
    The others' spread shrinks as ``16 / sqrt(dim)``: at width 32 here the margin is > 2
    logits, at width 1024 and 2048 (measured once on CPU) > 13 of about 16."""
    _, target, prompt, ar = pair
    assert modes.greedy_margin(target.model, prompt + ar) > 2.0


def test_rows_are_one_hot_at_the_oracle_token_of_the_position_they_predict(pair):
    draft_model, _, prompt, ar = pair
    ref = prompt + ar
    oracle = OracleDraft(draft_model, ref, 0.6, seed=2)
    check_stage(oracle, 0)
    assert oracle.capabilities.trees is False
    assert oracle.capabilities.num_params == draft_model.capabilities.num_params
    want = oracle_tokens(ref, 0.6, oracle.vocab_size, oracle.max_len + 1, seed=2)
    oracle.rollback(0)
    pos = 0
    for n, last_n in ((len(prompt), 1), (1, None), (3, None), (4, 2), (5, None)):
        rows = oracle.forward(torch.tensor(ref[pos:pos + n]), last_n=last_n)
        assert oracle.cache_len == pos + n
        first = pos + n - rows.shape[0] + 1
        assert rows.argmax(-1).tolist() == want[first:first + rows.shape[0]]
        assert torch.equal(rows.sum(-1), torch.ones(rows.shape[0]))
        pos += n
    oracle.rollback(len(prompt))
    assert draft_model.cache_len == len(prompt)
    with pytest.raises(ValueError, match="chains only"):
        oracle.forward(torch.tensor(ref[:2]), parents=torch.tensor([-1, 0]))
    oracle.rollback(0)


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
def test_a_pipeline_emits_ar_and_the_target_measures_about_the_set_acceptance(pair, mode):
    draft_model, target, prompt, ar = pair
    oracle = OracleDraft(draft_model, prompt + ar, 0.7, seed=modes.SEED)
    pipe = FastPipeline([oracle, target], adaptive_windows=False)
    res = pipe.generate(prompt, SZ.bench_new_tokens, ignore_eos=True, mode=mode)
    pipe.close()
    assert res.token_ids == ar
    st = res.stage_stats[-1]
    share = sum(is_right(p, 0.7, modes.SEED) for p in range(len(prompt), len(prompt + ar)))
    share /= len(ar)
    assert st.accepted + st.rejected > 60  # positions tested
    assert abs(st.alpha - share) < 0.12 and abs(st.alpha - 0.7) < 0.15, (st.alpha, share)


def test_the_gpu_benchmark_pairs_a_smollm2_135m_shape_with_llama3_8b():
    """The shapes of the issue's goal: the shipped SmolLM2 draft's config gives the width
    (its 3 layers are a cut of SmolLM2-135M's 30); the vocabulary is the target's."""
    import json

    from gpu_check_common import FULL

    hf = json.loads((ROOT / "models" / "drafts" / "SmolLM2-135M-draft" / "config.json")
                    .read_text())
    d = FULL.bench_draft
    assert (d["dim"], d["n_heads"], d["n_kv_heads"], d["head_dim"], d["intermediate_size"],
            d["rope_theta"], d["tie_word_embeddings"]) == (
        hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["head_dim"], hf["intermediate_size"], hf["rope_theta"], hf["tie_word_embeddings"])
    assert d["n_layers"] == 30 and "vocab_size" not in d
    assert modes.draft_config(FULL).vocab_size == FULL.model["vocab_size"] == 128256
    assert FULL.bench_target_layers == 32 and FULL.model["dim"] == 4096
    assert FULL.acceptances[0] == 0.7


class _Fake:
    """A stand-in inner stage: random logits, a cache length that moves."""

    name, vocab_size, max_len, device = "fake", 40, 64, torch.device("cpu")

    def __init__(self):
        from pipespec_fast.stages.base import StageCapabilities

        self.capabilities = StageCapabilities(num_params=7)
        self.cache_len = 0

    def forward(self, tokens, parents=None, last_n=None):
        self.cache_len += tokens.shape[0]
        return torch.randn(last_n or tokens.shape[0], self.vocab_size)


def test_the_oracle_reads_no_tensor_on_the_host(monkeypatch):
    """No host synchronisation: the forward's rows are chosen from host integers and written
    on the device (any read of a tensor's value would raise here)."""
    inner = _Fake()
    oracle = OracleDraft(inner, list(range(30)), 0.5, seed=1)

    def refuse(*_):
        raise AssertionError("a host read of a tensor")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    rows = [oracle.forward(torch.zeros(n, dtype=torch.int64), last_n=k)
            for n, k in ((5, 1), (3, None), (4, 2))]
    monkeypatch.undo()
    want = oracle_tokens(list(range(30)), 0.5, 40, 65, seed=1)
    assert [r.argmax(-1).tolist() for r in rows] == [want[5:6], want[6:9], want[11:13]]
