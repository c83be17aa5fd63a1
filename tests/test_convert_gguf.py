"""pipespec_fast.models.convert_gguf and models.defaults: GGUF -> HF conversion of llama models.

Oracles: ``gguf.quants.dequantize`` for the block formats and transformers' own GGUF loader
(model and tokenizer) for the converted default model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import pipespec_fast.models.convert_gguf as cg
import pipespec_fast.models.defaults as defaults
from pipespec_fast.config import from_env
from pipespec_fast.models.checkpoint import load_state_dict, scan_checkpoint
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.convert_gguf import (
    GGUFConversionError,
    convert_gguf,
    dequantize,
    hf_name,
    unpermute_qk,
)

QT = gguf.GGMLQuantizationType
PROMPT = "The capital of France is Paris. Speculative decoding makes 2+2="


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert's q/k row permutation (HF order -> GGUF order)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------- dequantisation


def _synthetic(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1))
    x[0, :32] = 0.25  # a constant block (zero scale)
    x[1, :32] = 0.0
    x[2, 5] = 40.0  # an outlier
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32])
def test_dequantize_matches_gguf_oracle(qtype) -> None:
    x = _synthetic(64, 256, seed=int(qtype))
    q = gguf.quants.quantize(x, qtype)
    ours = dequantize(q, qtype)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q, qtype).astype(np.float32))
    if qtype in (QT.Q4_1, QT.Q8_0):  # and it approximates the input
        err = np.abs(ours - x).max(axis=1) / (np.abs(x).max(axis=1) + 1e-9)
        assert err.max() < (0.1 if qtype == QT.Q4_1 else 0.01)


def test_dequantize_large_tensor_chunks(monkeypatch) -> None:
    monkeypatch.setattr(cg, "_CHUNK_BLOCKS", 7)  # many uneven chunks
    x = _synthetic(33, 320, seed=3)
    for qtype in (QT.Q4_1, QT.Q8_0, QT.Q4_0):
        q = gguf.quants.quantize(x, qtype)
        np.testing.assert_array_equal(dequantize(q, qtype), gguf.quants.dequantize(q, qtype))


def test_q4_1_block_layout_by_hand() -> None:
    # d = 0.5, m = -1.0; byte j holds element j (low nibble) and element j + 16 (high nibble)
    lo = np.arange(16, dtype=np.uint8)
    hi = (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate(
        [
            np.array([0.5], "<f2").view(np.uint8),
            np.array([-1.0], "<f2").view(np.uint8),
            lo | (hi << 4),
        ]
    )
    expected = np.concatenate([lo, hi]).astype(np.float32) * 0.5 - 1.0
    np.testing.assert_array_equal(dequantize(block[None], QT.Q4_1)[0], expected)


def test_q8_0_block_layout_by_hand() -> None:
    qs = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([0.25], "<f2").view(np.uint8), qs.view(np.uint8)])
    np.testing.assert_array_equal(dequantize(block[None], QT.Q8_0)[0], qs * np.float32(0.25))


def test_dequantize_rejects_unsupported_and_malformed() -> None:
    with pytest.raises(GGUFConversionError, match="not supported"):
        dequantize(np.zeros((1, 210), np.uint8), QT.Q6_K)
    with pytest.raises(GGUFConversionError, match="malformed"):
        dequantize(np.zeros((1, 21), np.uint8), QT.Q4_1)


def test_dequantize_real_smollm2_tensors() -> None:
    reader = gguf.GGUFReader(defaults.default_gguf_path())
    seen = set()
    for t in reader.tensors:
        kind = QT(t.tensor_type)
        if kind in seen and not t.name.startswith("blk.29."):
            continue
        seen.add(kind)
        ours = dequantize(t.data, kind)
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, kind), err_msg=t.name)
    assert {QT.Q4_1, QT.Q8_0, QT.F32} <= seen


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("n_head, head_dim, cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5)])
def test_unpermute_inverts_llamacpp_permutation(n_head: int, head_dim: int, cols: int) -> None:
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(llamacpp_permute(unpermute_qk(w, n_head), n_head), w)


def test_unpermute_maps_interleaved_pairs_to_halves() -> None:
    # GGUF keeps rotary pairs adjacent (rows 2j, 2j+1); HF keeps them a half apart (j, j+hd/2).
    n_head, hd = 2, 8
    gguf_rows = np.arange(n_head * hd)[:, None]
    hf = unpermute_qk(gguf_rows, n_head)[:, 0]
    for h in range(n_head):
        for j in range(hd // 2):
            assert hf[h * hd + j] == h * hd + 2 * j
            assert hf[h * hd + hd // 2 + j] == h * hd + 2 * j + 1
    with pytest.raises(GGUFConversionError):
        unpermute_qk(np.zeros((10, 4)), 3)


def test_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.weight") == "model.layers.0.self_attn.k_proj.weight"
    assert hf_name("blk.0.attn_v.weight") == "model.layers.0.self_attn.v_proj.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("blk.1.attn_norm.weight") == "model.layers.1.input_layernorm.weight"
    assert hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    with pytest.raises(GGUFConversionError, match="blk.0.attn_q.bias"):
        hf_name("blk.0.attn_q.bias")


# ----------------------------------------------------------------------------- tiny GGUF files

TINY = dict(
    vocab_size=64,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    rope_theta=50000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    fixed = {v: k for k, v in cg._GLOBAL_NAMES.items()}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = False,
    arch: str = "llama",
    drop: str | None = None,
    rope_freqs: np.ndarray | None = None,
    linear_scaling: float | None = None,
    quantize_all: bool = False,
) -> dict[str, np.ndarray]:
    """A small random llama GGUF as llama.cpp lays it out; returns the HF weights it encodes.

    Mixed types by default; ``quantize_all``: every matrix Q4_1 but the embedding (Q8_0), as in
    the real SmolLM2 file."""
    config = LlamaConfig(**TINY, tie_word_embeddings=tied)
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if linear_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_scaling)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    hf: dict[str, np.ndarray] = {}
    for name, shape in config.expected_shapes().items():
        if name == drop:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        g = _gguf_name(name)
        stored = x
        if ".attn_q." in g:
            stored = llamacpp_permute(x, config.n_heads)
        elif ".attn_k." in g:
            stored = llamacpp_permute(x, config.n_kv_heads)
        if g == "token_embd.weight":  # Q8_0, as in the real file
            q = gguf.quants.quantize(stored, QT.Q8_0)
            w.add_tensor(g, q, raw_dtype=QT.Q8_0)
            x = gguf.quants.dequantize(q, QT.Q8_0)
        elif quantize_all and len(shape) == 2:
            q = gguf.quants.quantize(stored, QT.Q4_1)
            w.add_tensor(g, q, raw_dtype=QT.Q4_1)
            x = gguf.quants.dequantize(q, QT.Q4_1)
            if ".attn_q." in g:
                x = unpermute_qk(x, config.n_heads)
            elif ".attn_k." in g:
                x = unpermute_qk(x, config.n_kv_heads)
        elif g.endswith("ffn_up.weight"):  # Q4_1
            q = gguf.quants.quantize(stored, QT.Q4_1)
            w.add_tensor(g, q, raw_dtype=QT.Q4_1)
            x = gguf.quants.dequantize(q, QT.Q4_1)
        elif g.endswith("attn_v.weight"):  # F16
            w.add_tensor(g, stored.astype(np.float16))
            x = x.astype(np.float16).astype(np.float32)
        elif g.endswith("attn_k.weight"):  # Q4_1 through the un-permutation
            q = gguf.quants.quantize(stored, QT.Q4_1)
            w.add_tensor(g, q, raw_dtype=QT.Q4_1)
            x = unpermute_qk(gguf.quants.dequantize(q, QT.Q4_1), config.n_kv_heads)
        else:
            w.add_tensor(g, stored)
        hf[name] = x
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_conversion_exact(tmp_path: Path, tied: bool) -> None:
    src = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(src, tied=tied)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    config = LlamaConfig.from_dir(out)
    assert config == LlamaConfig(
        **TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_ids=[2]
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pad_token_id"] == 0 and cfg["rope_theta"] == 50000.0
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    marker = json.loads((out / cg.COMPLETE_MARKER).read_text())
    assert marker["converter_version"] == cg.CONVERTER_VERSION
    sd = load_state_dict(out, config)
    assert set(sd) == set(hf)
    for name, x in hf.items():
        np.testing.assert_array_equal(sd[name].numpy(), x, err_msg=name)
    assert _leftovers(tmp_path) == []


def test_tiny_gguf_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    src = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = model.state_dict()
    for name, x in hf.items():
        np.testing.assert_array_equal(sd[name].numpy(), x, err_msg=name)
    assert model.config.rope_parameters["rope_theta"] == 50000.0


def _llama3_rope_freqs(params: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs (frequency divisors), from transformers' llama3 rope."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFLlamaConfig(
        hidden_size=32,
        num_attention_heads=32 // head_dim,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, **params},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / scaled.double()).numpy()


def test_llama3_rope_scaling_recovered(tmp_path: Path) -> None:
    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    freqs = _llama3_rope_freqs(params, TINY["head_dim"], TINY["rope_theta"])
    assert freqs.min() == pytest.approx(1.0) and freqs.max() == pytest.approx(8.0)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, rope_freqs=freqs)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    assert LlamaConfig.from_dir(out).rope_scaling == params
    assert "rope_freqs.weight" not in scan_checkpoint(out)


def test_unsupported_inputs_write_nothing(tmp_path: Path) -> None:
    cases = {
        "arch.gguf": (dict(arch="qwen2"), "qwen2"),
        "missing.gguf": (dict(drop="model.layers.1.mlp.gate_proj.weight"), "gate_proj"),
        "linear.gguf": (dict(linear_scaling=2.0), "linear"),
    }
    for fname, (kw, needle) in cases.items():
        write_tiny_gguf(tmp_path / fname, **kw)
        with pytest.raises(GGUFConversionError, match=needle):
            convert_gguf(tmp_path / fname, tmp_path / "out", tokenizer=False, progress=False)
        assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out", tokenizer=False)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(GGUFConversionError, match="junk.gguf"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out", tokenizer=False)


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFConversionError, match="tokenizer"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    real, calls = cg._hf_tensor, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(cg, "_hf_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_kept_unless_overwrite(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # "older"
    old_config = (out / "config.json").read_text()
    with pytest.raises(FileExistsError):
        convert_gguf(src, out, tokenizer=False, progress=False)
    assert (out / "config.json").read_text() == old_config

    # A failing overwrite leaves the old directory untouched.
    monkeypatch.setattr(cg, "_hf_tensor", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        convert_gguf(src, out, overwrite=True, tokenizer=False, progress=False)
    assert (out / "config.json").read_text() == old_config
    monkeypatch.undo()

    convert_gguf(src, out, overwrite=True, tokenizer=False, progress=False)
    assert (out / "config.json").read_text() != old_config
    assert (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("extra", ["notes.txt", "subfolder"])
def test_overwrite_never_replaces_a_folder_of_other_things(tmp_path: Path, extra) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    if extra == "subfolder":
        (out / extra).mkdir()
    else:
        (out / extra).write_text("mine")
    with pytest.raises(FileExistsError, match=extra):
        convert_gguf(src, out, overwrite=True, tokenizer=False, progress=False)
    assert (out / extra).exists() and (out / "config.json").read_text() == "{}"


def test_published_files_have_ordinary_modes(tmp_path: Path) -> None:
    import os
    import stat

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    umask = os.umask(0o022)
    try:
        out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_a_killed_conversions_temp_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    import subprocess
    import sys

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    abandoned = tmp_path / f".out.tmp-{dead}-abc123"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"0" * 1000)
    alive = tmp_path / f".out.tmp-{os_getpid()}-def456"  # a conversion still running here
    alive.mkdir()
    convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    assert not abandoned.exists() and alive.exists()


def os_getpid() -> int:
    import os

    return os.getpid()


# ----------------------------------------------------------------------------- defaults


def test_cache_dir_env(configure, tmp_path: Path) -> None:
    configure(cache_dir=from_env({"PIPESPEC_CACHE": str(tmp_path / "c")}).cache_dir)
    assert defaults.cache_dir() == tmp_path / "c"
    configure(cache_dir=from_env({}).cache_dir)
    assert defaults.cache_dir() == Path.home() / ".cache" / "pipespec-fast"


def test_default_gguf_path() -> None:
    p = defaults.default_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()


def test_default_gguf_missing_tells_to_run_setup(monkeypatch) -> None:
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"scripts/setup\.sh"):
        defaults.default_gguf_path()


def test_default_target_dir_converts_once_and_survives_races(monkeypatch, configure,
                                                             tmp_path) -> None:
    src = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    write_tiny_gguf(src)
    configure(cache_dir=tmp_path / "cache")
    monkeypatch.setattr(defaults, "default_gguf_path", lambda: src)
    real, calls = defaults.convert_gguf, []

    def counting(gguf_path, out, **kw):
        calls.append(out)
        return real(gguf_path, out, tokenizer=False, **kw)

    monkeypatch.setattr(defaults, "convert_gguf", counting)
    target = defaults.default_target_dir(progress=False)
    assert target.parent == tmp_path / "cache" / "models" and defaults.is_complete(target)
    assert defaults.default_target_dir() == target and len(calls) == 1
    assert defaults.default_model_dirs() == [defaults.DRAFT_DIR, target]

    # Another process publishes first: ours loses the rename and reuses the winner's.
    import shutil

    shutil.rmtree(target)

    def racing(gguf_path, out, **kw):
        real(gguf_path, out, tokenizer=False, progress=False)  # the "other process"
        return real(gguf_path, out, tokenizer=False, **kw)

    monkeypatch.setattr(defaults, "convert_gguf", racing)
    assert defaults.default_target_dir(progress=False) == target
    assert defaults.is_complete(target) and _leftovers(target.parent) == []

    # A directory without a completion marker is replaced; stale temp dirs are swept.
    (target / cg.COMPLETE_MARKER).unlink()
    stale = target.parent / ".x.tmp-old"
    stale.mkdir()
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    monkeypatch.setattr(defaults, "convert_gguf", counting)
    assert defaults.default_target_dir(progress=False) == target
    assert defaults.is_complete(target) and len(calls) == 2 and not stale.exists()


# ----------------------------------------------------------------------------- real default


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The converted default model, shared by the tests (cached under cache_dir())."""
    return defaults.default_target_dir(progress=False)


@pytest.fixture(scope="session")
def gguf_tokenizer():
    from transformers import AutoTokenizer

    path = defaults.default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
def test_default_config(default_dir: Path) -> None:
    config = LlamaConfig.from_dir(default_dir)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (576, 30, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert config.rms_norm_eps == 1e-5
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
    sd = load_state_dict(default_dir, config)
    assert "lm_head.weight" not in sd and len(sd) == 2 + 9 * 30


@pytest.mark.slow
def test_default_tokenizer_matches_gguf_tokenizer(default_dir: Path, gguf_tokenizer) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(default_dir)
    texts = [
        PROMPT,
        "  héllo wörld\n\tindented 123456 🤗 <|im_start|>user\nhi<|im_end|>",
        "def f(x):\n    return x ** 2  # square",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == gguf_tokenizer.encode(text)
        assert tok.decode(ids) == gguf_tokenizer.decode(ids) == text
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.chat_template and tok.chat_template == gguf_tokenizer.chat_template
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat == gguf_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    gen = GenerationConfig.from_pretrained(default_dir)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)


@pytest.mark.slow
def test_default_logits_match_transformers_gguf_loader(default_dir: Path, gguf_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = defaults.default_gguf_path()
    ids = torch.tensor([gguf_tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours = LlamaForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
        ours_logits = ours(ids).logits
        del ours
        ref = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        ref_logits = ref(ids).logits
    assert ours_logits.shape == (1, ids.shape[1], 49152)
    assert (ours_logits - ref_logits).abs().max().item() <= 1e-3
    # And the model is sane: greedy continuation of "2+2=" is "4".
    assert gguf_tokenizer.decode(ours_logits[0, -1].argmax().item()).strip() == "4"
