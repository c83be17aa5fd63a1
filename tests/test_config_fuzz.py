"""A model folder's config.json, mutated at random (hypothesis): the loader either refuses it
with a one-line ValueError-family error naming what is wrong, or, for mutations that do not
touch what the forward computes, loads a model whose output equals the reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import random_hf_state, tiny_config

from pipespec_fast.models.checkpoint import save_state_dict
from pipespec_fast.models.config import REQUIRED_HF_FIELDS, LlamaConfig
from pipespec_fast.models.llama import Transformer

PROMPT = torch.tensor([1, 5, 7, 9, 3])
# fields that the forward does not read (within their valid range)
HARMLESS = {
    "architectures": st.lists(st.text(max_size=8), max_size=2),
    "torch_dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "bos_token_id": st.integers(0, 63) | st.none(),
    "eos_token_id": st.integers(0, 63) | st.lists(st.integers(0, 63), min_size=1, max_size=3),
    "max_position_embeddings": st.integers(64, 4096),
    "hidden_act": st.just("silu"),
    "unknown_field": st.integers() | st.text(max_size=5),
}
BAD_NUMBER = st.sampled_from([0, -1, -5, 0.0, -0.5, math.nan, math.inf, -math.inf, "12", True,
                              None, [], {}, 1.5])
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
                          lambda c: st.lists(c, max_size=2) | st.dictionaries(
                              st.text(max_size=3), c, max_size=2), max_leaves=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = tiny_config(vocab=64, dim=32, n_layers=1)
    d = tmp_path_factory.mktemp("tiny")
    save_state_dict(d, random_hf_state(cfg, seed=3), cfg)
    return d


@pytest.fixture(scope="module")
def reference(model_dir) -> torch.Tensor:
    return _logits(model_dir)


def _logits(d: Path) -> torch.Tensor:
    m = Transformer.from_pretrained(d)
    return m(PROMPT, m.new_cache(16))


def _with_config(src: Path, dst: Path, cfg) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_one_line_value_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_harmless_mutations_load_the_same_model(model_dir, reference, tmp_path, data):
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in data.draw(st.sets(st.sampled_from(sorted(HARMLESS)), min_size=1)):
        cfg[key] = data.draw(HARMLESS[key])
    d = _with_config(model_dir, tmp_path / "m", cfg)
    assert torch.equal(_logits(d), reference)


SIZE_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings"]


@SETTINGS
@given(key=st.sampled_from(SIZE_FIELDS + ["rope_theta", "rms_norm_eps"]), value=BAD_NUMBER)
def test_out_of_range_values_are_refused_naming_the_field(model_dir, tmp_path, key, value):
    cfg = json.loads((model_dir / "config.json").read_text())
    if key == "rms_norm_eps" and value in (0, 0.0):
        return  # eps = 0 is a valid (if unusual) RMSNorm
    if key in ("rope_theta", "rms_norm_eps") and value == 1.5:
        return  # a fine real number (bad only where an integer is expected)
    if value is None and key not in REQUIRED_HF_FIELDS:
        return  # an optional field left empty takes its default
    cfg[key] = value
    d = _with_config(model_dir, tmp_path / "m", cfg)
    _assert_one_line_value_error(lambda: Transformer.from_pretrained(d), "config.json")


@SETTINGS
@given(key=st.sampled_from(REQUIRED_HF_FIELDS))
def test_missing_required_fields_are_named(model_dir, tmp_path, key):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg[key]
    d = _with_config(model_dir, tmp_path / "m", cfg)
    _assert_one_line_value_error(lambda: Transformer.from_pretrained(d), key)


@SETTINGS
@given(doc=JSON_VALUE.filter(lambda v: not isinstance(v, dict)) | st.dictionaries(
    st.sampled_from(SIZE_FIELDS + ["model_type", "rope_scaling", "eos_token_id"]), JSON_VALUE,
    max_size=4))
def test_arbitrary_documents_never_crash_the_loader(model_dir, tmp_path, doc):
    d = _with_config(model_dir, tmp_path / "m", doc)
    _assert_one_line_value_error(lambda: Transformer.from_pretrained(d), "config.json")


def test_zero_heads_and_bad_rope_are_value_errors_not_crashes():
    base = tiny_config().to_hf_dict()
    for key, value, needle in [("num_attention_heads", 0, "num_attention_heads"),
                               ("rope_theta", -1.0, "rope_theta"),
                               ("rms_norm_eps", -1e-5, "rms_norm_eps"),
                               ("max_position_embeddings", -3, "max_position_embeddings")]:
        d = dict(base, **{key: value})
        _assert_one_line_value_error(lambda d=d: LlamaConfig.from_hf_dict(d), needle)
    scaled = dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    _assert_one_line_value_error(lambda: LlamaConfig.from_hf_dict(scaled), "low_freq_factor")
