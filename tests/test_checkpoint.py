"""pipespec_fast.models.checkpoint: HF safetensors loading/saving and its validation errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import pipespec_fast.models.checkpoint as ckpt
from pipespec_fast.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict,
    save_state_dict,
)
from pipespec_fast.models.config import LlamaConfig


def tiny_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=[2],
    )
    base.update(kw)
    return LlamaConfig(**base)


def random_tensors(config: LlamaConfig, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g).to(dtype)
        for name, shape in config.expected_shapes().items()
    }


def assert_same(loaded: dict, written: dict, dtype=torch.float32) -> None:
    assert list(loaded) == list(written)
    for name, t in written.items():
        assert loaded[name].dtype == dtype, name
        assert torch.equal(loaded[name], t.to(dtype)), name


def test_single_file_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    files = save_state_dict(tmp_path, tensors, config)
    assert {f.name for f in files} == {"model.safetensors", "config.json"}
    assert LlamaConfig.from_dir(tmp_path) == config
    assert_same(load_state_dict(tmp_path, config), tensors)
    loaded_config, sd = load_checkpoint(tmp_path)
    assert loaded_config == config
    assert_same(sd, tensors)


def test_sharded_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config, seed=1)
    save_state_dict(tmp_path, tensors, config, shard_size_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same(load_state_dict(tmp_path, config), tensors)


def test_resave_replaces_previous_layout(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config, seed=2), config, shard_size_bytes=20_000)
    tensors = random_tensors(config, seed=3)
    save_state_dict(tmp_path, tensors, config)
    assert not list(tmp_path.glob("model-*")) and not list(tmp_path.glob("*.index.json"))
    assert_same(load_state_dict(tmp_path, config), tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_conversion(tmp_path: Path, dtype: torch.dtype) -> None:
    config = tiny_config()
    tensors = random_tensors(config, seed=4)
    save_state_dict(tmp_path, tensors, config, shard_size_bytes=30_000)
    assert_same(load_state_dict(tmp_path, config, dtype=dtype), tensors, dtype)


def test_bf16_checkpoint_to_fp32(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config, seed=5, dtype=torch.bfloat16)
    save_state_dict(tmp_path, tensors, config)
    assert_same(load_state_dict(tmp_path, config), tensors, torch.float32)


def test_non_float_dtype_argument_rejected(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config)
    with pytest.raises(ValueError, match="floating-point"):
        load_state_dict(tmp_path, config, dtype=torch.int32)


def test_tied_embeddings(tmp_path: Path) -> None:
    config = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(config)
    assert "lm_head.weight" not in tensors
    save_state_dict(tmp_path, tensors, config)
    assert_same(load_state_dict(tmp_path, config), tensors)

    # A stored lm_head of a tied model is ignored, as are rotary inv_freq buffers.
    extra = dict(tensors)
    extra["lm_head.weight"] = torch.randn(config.vocab_size, config.dim)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(config.head_dim // 2)
    save_state_dict(tmp_path, extra, config)
    assert_same(load_state_dict(tmp_path, config), tensors)


def test_shared_lm_head_dropped_on_save(tmp_path: Path) -> None:
    config = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # same storage
    save_state_dict(tmp_path, tensors, config)
    assert "lm_head.weight" not in ckpt.scan_checkpoint(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_state_dict(tmp_path, config)


def test_missing_lm_head_when_untied(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    del tensors["lm_head.weight"]
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):
        load_state_dict(tmp_path, config)


def test_unexpected_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(
        CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        load_state_dict(tmp_path, config)


def test_extra_layer_is_unexpected(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(tiny_config(n_layers=3)), config)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.2\."):
        load_state_dict(tmp_path, config)


def test_wrong_shape(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(32, 32)
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(tmp_path, config)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "expected [16, 32]" in msg and "found [32, 32]" in msg


def test_non_float_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*I32"):
        load_state_dict(tmp_path, config)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    del tensors["model.norm.weight"]
    tensors["bogus.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(tmp_path, config)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "bogus.weight" in msg and "lm_head.weight" in msg


def test_nothing_materialised_before_validation(tmp_path: Path, monkeypatch) -> None:
    config = tiny_config()
    tensors = random_tensors(config)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.randn(2, 2)
    save_state_dict(tmp_path, tensors, config, shard_size_bytes=20_000)

    def boom(*a, **k):
        raise AssertionError("tensors were read before the checkpoint was validated")

    monkeypatch.setattr(ckpt, "_materialize", boom)
    with pytest.raises(CheckpointError, match=r"down_proj"):
        load_state_dict(tmp_path, config)


def test_missing_shard(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config, shard_size_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=re.escape(victim.name)) as e:
        load_state_dict(tmp_path, config)
    assert isinstance(e.value, FileNotFoundError)


def test_index_names_tensor_absent_from_shard(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config, shard_size_bytes=20_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    assert index["weight_map"]["model.norm.weight"] != last
    index["weight_map"]["model.norm.weight"] = last
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"model\.norm\.weight.*{re.escape(last)}"):
        load_state_dict(tmp_path, config)


def test_corrupt_index(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config, shard_size_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load_state_dict(tmp_path, config)


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_file(tmp_path: Path, sharded: bool) -> None:
    config = tiny_config()
    save_state_dict(
        tmp_path, random_tensors(config), config, shard_size_bytes=20_000 if sharded else None
    )
    victim = sorted(tmp_path.glob("model*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(str(victim))):
        load_state_dict(tmp_path, config)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d[:8] + b"{garbage" + d[16:],  # invalid JSON header
        lambda d: (10**12).to_bytes(8, "little") + d[8:],  # header length beyond the file
        lambda d: d[:5],  # shorter than the length prefix
        lambda d: b"",  # empty file
    ],
    ids=["bad-json", "bad-length", "tiny", "empty"],
)
def test_corrupt_header(tmp_path: Path, corrupt) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config)
    victim = tmp_path / "model.safetensors"
    victim.write_bytes(corrupt(victim.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(str(victim))):
        load_state_dict(tmp_path, config)


def test_no_safetensors_file(tmp_path: Path) -> None:
    config = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"no safetensors checkpoint"):
        load_state_dict(tmp_path, config)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"\.bin"):
        load_state_dict(tmp_path, config)


def test_shards_without_index(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config, shard_size_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-.*no model\.safetensors\.index"):
        load_state_dict(tmp_path, config)


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        load_state_dict(tmp_path / "nope", tiny_config())


def test_unsupported_model_type(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config)
    d = json.loads((tmp_path / "config.json").read_text())
    d["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"unsupported model_type 'mistral'"):
        load_checkpoint(tmp_path)


def test_no_config_json(tmp_path: Path) -> None:
    config = tiny_config()
    save_state_dict(tmp_path, random_tensors(config), config)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------ vocabulary subsets


def subset_tensors(config: LlamaConfig, ids) -> dict:
    tensors = random_tensors(config)
    tensors["model.vocab_subset_ids"] = torch.tensor(ids, dtype=torch.int64)
    return tensors


def test_vocab_subset_round_trip_keeps_ids_integer(tmp_path: Path) -> None:
    config = tiny_config(vocab_subset=5)
    assert config.expected_shapes()["model.embed_tokens.weight"] == (6, 32)
    assert config.expected_shapes()["lm_head.weight"] == (5, 32)
    tensors = subset_tensors(config, [0, 2, 3, 10, 63])
    save_state_dict(tmp_path, tensors, config)
    assert LlamaConfig.from_dir(tmp_path) == config
    loaded = load_state_dict(tmp_path, config, dtype=torch.float16)
    assert loaded["model.vocab_subset_ids"].dtype == torch.int64
    assert loaded["model.vocab_subset_ids"].tolist() == [0, 2, 3, 10, 63]
    assert loaded["model.norm.weight"].dtype == torch.float16


@pytest.mark.parametrize("ids,dtype,message", [
    ([0, 2, 3, 10, 64], torch.int64, "outside"),
    ([0, 3, 2, 10, 11], torch.int64, "ascending"),
    ([0, 2, 2, 10, 11], torch.int32, "ascending"),
    ([0, 2, 3, 10, 11], torch.float32, "dtype F32"),
])
def test_bad_vocab_subset_ids_name_the_tensor(tmp_path: Path, ids, dtype, message) -> None:
    config = tiny_config(vocab_subset=5)
    tensors = subset_tensors(config, ids)
    tensors["model.vocab_subset_ids"] = tensors["model.vocab_subset_ids"].to(dtype)
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match=rf"model\.vocab_subset_ids.*{message}"):
        load_state_dict(tmp_path, config)


def test_missing_vocab_subset_ids_and_bad_subset_size(tmp_path: Path) -> None:
    config = tiny_config(vocab_subset=5)
    tensors = subset_tensors(config, [0, 1, 2, 3, 4])
    del tensors["model.vocab_subset_ids"]
    save_state_dict(tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.vocab_subset_ids"):
        load_state_dict(tmp_path, config)
    with pytest.raises(ValueError, match="vocab_subset_size"):
        tiny_config(vocab_subset=65)


def test_read_owned_equals_safetensors_and_reads_rows_alone(tmp_path: Path) -> None:
    """``read_owned`` (plain file reads, no memory map) gives safetensors' own tensors, as
    stored, and rows of a 2-D tensor alone; bad ranges and rows are named errors."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(7, 5, generator=g).half(), "b": torch.randint(0, 255, (4, 9),
               dtype=torch.uint8, generator=g), "c": torch.randn(3, generator=g),
               "e": torch.empty(0, 4), "s": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    want = load_file(str(path))
    got = ckpt.read_owned(path, list(tensors))
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    rows = ckpt.read_owned(path, ["a", "b"], {"a": [6, 0, 3], "b": []})
    assert torch.equal(rows["a"], want["a"][[6, 0, 3]]) and rows["b"].shape == (0, 9)
    with pytest.raises(CheckpointError, match="tensor a has no row 7"):
        ckpt.read_owned(path, ["a"], {"a": [7]})
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.read_owned(path, ["missing"])
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last = max(tensors, key=lambda n: header[n]["data_offsets"][1])  # stored last
    path.write_bytes(data[:-3])  # its bytes cut short
    with pytest.raises(CheckpointError, match=f"tensor {last} is cut short"):
        ckpt.read_owned(path, [last])
