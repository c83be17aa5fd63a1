"""Convert a llama-architecture GGUF file into a Hugging Face layout model directory.

The output holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32)
and the tokenizer files, so that both :func:`.checkpoint.load_state_dict` and
``transformers`` (``LlamaForCausalLM`` / ``AutoTokenizer.from_pretrained(out_dir)``) read it
offline. Quantised blocks (Q4_0, Q4_1, Q8_0) and F16/BF16/F32 are dequantised here with numpy;
llama.cpp's row permutation of ``attn_q`` / ``attn_k`` is undone. The quantised and fp16
matrices are also kept as stored, in ``packed.safetensors`` (:data:`PACKED_FILE`; uint8
``[rows, row_bytes]`` per HF tensor name, kinds in the metadata), which the CPU engine uses
instead of the fp32 copies (``pipespec_fast.cpu.quant``: same values, fewer bytes). The output is
written to a temporary sibling directory and renamed into place at the end, so an interrupted
conversion never leaves a half-written ``out_dir``.

CLI: ``pipespec-fast convert MODEL.gguf OUT_DIR`` (or ``python -m
pipespec_fast.models.convert_gguf``), with ``--overwrite`` and ``--no-tokenizer``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipespec_fast.models import hf_names
from pipespec_fast.models.checkpoint import CONFIG_FILE, PACKED_FILE, SINGLE_FILE
from pipespec_fast.models.config import LlamaConfig

CONVERTER_VERSION = 2  # 2: also writes PACKED_FILE
COMPLETE_MARKER = ".pipespec-complete"

# ggml type id -> (name, elements per block, bytes per block). Layouts (ggml-common.h):
#   Q4_0: fp16 d, 16 bytes of nibbles        x = (q - 8) * d
#   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles x = q * d + m
#   Q8_0: fp16 d, 32 int8                     x = q * d
# In a 4-bit block the low nibbles of bytes 0..15 are elements 0..15, the high ones 16..31.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_TYPES: dict[int, tuple[str, int, int]] = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    BF16: ("BF16", 1, 2),
    Q4_0: ("Q4_0", 32, 18),
    Q4_1: ("Q4_1", 32, 20),
    Q8_0: ("Q8_0", 32, 34),
}
_CHUNK_BLOCKS = 1 << 16  # blocks dequantised per step: bounds the temporaries to a few MB


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (wrong architecture, unsupported type, ...)."""


def _type_info(qtype: int) -> tuple[str, int, int]:
    info = _TYPES.get(int(qtype))
    if info is None:
        supported = ", ".join(name for name, _, _ in _TYPES.values())
        raise GGUFConversionError(f"ggml type {int(qtype)} is not supported (only {supported})")
    return info


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte ``start`` of every block, as a float32 (n, 1) column."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(np.float32)


def _dequant_blocks(blocks: np.ndarray, qtype: int, out: np.ndarray) -> None:
    """Dequantise ``blocks`` (n, bytes per block) into ``out`` (n, 32) float32."""
    if qtype == Q8_0:
        out[...] = blocks[:, 2:34].view(np.int8)
        out *= _f16_column(blocks, 0)
        return
    qs = blocks[:, -16:]
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    if qtype == Q4_1:
        out *= _f16_column(blocks, 0)
        out += _f16_column(blocks, 2)
    else:  # Q4_0
        out -= 8.0
        out *= _f16_column(blocks, 0)


def dequantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Dequantise raw GGUF tensor bytes of ggml type ``qtype`` to float32.

    ``data`` is viewed as bytes; its last axis is one row (as ``GGUFReader`` and
    ``gguf.quants`` lay it out), so the result has shape ``(*data.shape[:-1], n_per_row)``.
    """
    name, block, nbytes = _type_info(qtype)
    raw = np.ascontiguousarray(data)
    if raw.ndim == 0:
        raise GGUFConversionError(f"{name} data must have at least one axis")
    raw = raw.view(np.uint8)
    if raw.shape[-1] % nbytes:
        raise GGUFConversionError(f"{name} data of {raw.shape[-1:]} bytes per row is malformed")
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    out_shape = (*lead, row_bytes // nbytes * block)
    flat = raw.reshape(-1)
    if qtype == F32:
        return flat.view("<f4").astype(np.float32).reshape(out_shape)
    if qtype == F16:
        return flat.view("<f2").astype(np.float32).reshape(out_shape)
    if qtype == BF16:
        return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(out_shape)
    blocks = flat.reshape(-1, nbytes)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        _dequant_blocks(blocks[i : i + _CHUNK_BLOCKS], qtype, out[i : i + _CHUNK_BLOCKS])
    return out.reshape(out_shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection (rows = heads x dim).

    llama.cpp stores ``w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)``: the two
    rotary halves of each head interleaved. Use ``n_kv_heads`` for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's tensor names -> the HF ones (per layer: ``blk.{i}.NAME.weight`` -> a suffix).
_GLOBAL_NAMES = {
    "token_embd.weight": hf_names.EMBED,
    "output_norm.weight": hf_names.FINAL_NORM,
    "output.weight": hf_names.HEAD,
}
_LAYER_NAMES = {
    "attn_norm": hf_names.ATTN_NORM,
    "ffn_norm": hf_names.FFN_NORM,
    "attn_q": hf_names.Q,
    "attn_k": hf_names.K,
    "attn_v": hf_names.V,
    "attn_output": hf_names.O,
    "ffn_gate": hf_names.GATE,
    "ffn_up": hf_names.UP,
    "ffn_down": hf_names.DOWN,
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Tensors that carry no weights of the HF layout (rope_freqs feeds rope_scaling instead).
_SKIPPED = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str:
    """The HF tensor name of a llama GGUF tensor; ``GGUFConversionError`` if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return hf_names.layer(int(m.group(1)), _LAYER_NAMES[m.group(2)])
    raise GGUFConversionError(f"GGUF tensor {gguf_name} has no Hugging Face llama equivalent")


def _fields(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata (token lists and other arrays are skipped)."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        v = field.contents()
        out[key] = v.item() if isinstance(v, np.generic) else v
    return out


def _f32_clean(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_factors(head_dim: int, theta: float, p: dict[str, float]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` (divisor of each rotary frequency) for llama3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    orig, lo, hi, f = (
        p["original_max_position_embeddings"],
        p["low_freq_factor"],
        p["high_freq_factor"],
        p["factor"],
    )
    smooth = (orig / wavelen - lo) / (hi - lo)
    factors = 1.0 / ((1 - smooth) / f + smooth)
    factors = np.where(wavelen < orig / hi, 1.0, factors)
    return np.where(wavelen > orig / lo, f, factors)


def _infer_llama3(rope_freqs: np.ndarray, head_dim: int, theta: float, orig: int | None) -> dict:
    """Recover the llama3 ``rope_scaling`` dict that produced a GGUF ``rope_freqs`` tensor."""
    if rope_freqs.shape != (head_dim // 2,):
        raise GGUFConversionError(
            f"rope_freqs.weight has {rope_freqs.size} values, expected {head_dim // 2}"
        )
    factor = float(np.max(rope_freqs))
    origs = [orig] if orig else [8192, 4096, 2048, 16384]
    for o in origs:
        for lo in (1.0, 2.0, 0.5):
            for hi in (4.0, 8.0, 2.0, 1.0):
                if hi <= lo:
                    continue
                p = {
                    "rope_type": "llama3",
                    "factor": round(factor, 6),
                    "low_freq_factor": lo,
                    "high_freq_factor": hi,
                    "original_max_position_embeddings": int(o),
                }
                if np.allclose(_llama3_factors(head_dim, theta, p), rope_freqs, rtol=1e-4):
                    return p
    raise GGUFConversionError(
        "rope_freqs.weight holds rotary scaling factors that match no llama3 setting tried"
    )


def config_from_gguf(reader: Any) -> tuple[LlamaConfig, dict[str, Any]]:
    """The :class:`LlamaConfig` of a GGUF file, and extra HF config keys (``pad_token_id``)."""
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    get = functools.partial(_llama_key, meta)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFConversionError("GGUF has no token_embd.weight tensor")
    dim = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", dim // n_heads))
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise GGUFConversionError(f"partial rotary ({rot} of {head_dim} dims) is not supported")
    theta = float(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 2048))
    scaling = _rope_scaling(get, tensors, head_dim, theta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids = _eos_ids(meta)
    try:
        config = LlamaConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml shape: (dim, vocab)
            dim=dim,
            n_layers=int(get("block_count", required=True)),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(get("feed_forward_length", required=True)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=_f32_clean(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=ctx,
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )
    except ValueError as e:
        raise GGUFConversionError(f"unsupported GGUF model: {e}") from e
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return config, ({} if pad is None else {"pad_token_id": int(pad)})


def _llama_key(meta: dict[str, Any], key: str, default: Any = None,
               required: bool = False) -> Any:
    """Metadata ``llama.<key>`` (``GGUFConversionError`` when ``required`` and missing)."""
    v = meta.get(f"llama.{key}", default)
    if v is None and required:
        raise GGUFConversionError(f"GGUF metadata llama.{key} is missing")
    return v


def _rope_scaling(get: Callable[..., Any], tensors: dict[str, Any], head_dim: int,
                  theta: float) -> dict[str, Any] | None:
    """The HF ``rope_scaling``: llama3's, recovered from a ``rope_freqs`` tensor, or the kind
    and factor the metadata names (``None``: no scaling)."""
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor", get("rope.scale_linear"))
    orig = get("rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        freqs = dequantize(np.asarray(t.data), int(t.tensor_type)).reshape(-1).astype(np.float64)
        return _infer_llama3(freqs, head_dim, theta, orig)
    named = kind not in (None, "none") or (kind is None and factor not in (None, 1.0))
    if not named:
        return None
    scaling: dict[str, Any] = {"rope_type": kind or "linear", "factor": float(factor or 1.0)}
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """End-of-sequence ids: eos, then end-of-turn and end-of-message, without repeats."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def _hf_tensor(reader: Any, t: Any, config: LlamaConfig) -> np.ndarray:
    """One GGUF tensor as the float32 HF weight (dequantised, q/k rows un-permuted)."""
    raw = reader.data[t.data_offset : t.data_offset + t.n_bytes]
    shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest axis first
    w = dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1), int(t.tensor_type))
    return _unpermute_rows(t.name, w.reshape(shape), config)


def _unpermute_rows(gguf_name: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """``w`` (rows first) with llama.cpp's rotary row order undone if it is a q or k matrix."""
    if gguf_name.endswith(".attn_q.weight"):
        return unpermute_qk(w, config.n_heads)
    if gguf_name.endswith(".attn_k.weight"):
        return unpermute_qk(w, config.n_kv_heads)
    return w


def _write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[int], np.ndarray],
    progress: Callable[[], None],
) -> None:
    """Stream float32 tensors into a safetensors file: the header first, then one at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        end = offset + 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, shape) in enumerate(specs):
            w = np.ascontiguousarray(produce(i), dtype="<f4")
            if w.shape != shape:
                raise GGUFConversionError(f"{name}: produced shape {w.shape}, expected {shape}")
            f.write(memoryview(w).cast("B"))
            progress()
        f.flush()
        os.fsync(f.fileno())


# ggml types the packed-weight kernel runs (pipespec_fast.cpu.quant kinds), for 2-D weights.
_PACKED_KINDS = {F16: 1, Q4_1: 2, Q8_0: 3}


def _packed_tensor(reader: Any, t: Any, config: LlamaConfig) -> np.ndarray:
    """One GGUF matrix as stored (uint8 ``[rows, row_bytes]``), q/k rows un-permuted."""
    raw = np.asarray(reader.data[t.data_offset : t.data_offset + t.n_bytes], dtype=np.uint8)
    rows = int(t.shape[-1])
    return np.ascontiguousarray(_unpermute_rows(t.name, raw.reshape(rows, -1), config))


def _write_packed(path: Path, reader: Any, plan: dict[str, Any], config: LlamaConfig) -> int:
    """Write :data:`PACKED_FILE` for the packable matrices of ``plan``; returns how many."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    kinds: dict[str, int] = {}
    for name, t in plan.items():
        kind = _PACKED_KINDS.get(int(t.tensor_type))
        shape = tuple(int(s) for s in reversed(t.shape))
        if kind is None or len(shape) != 2 or shape[1] % 32:
            continue
        tensors[name] = _packed_tensor(reader, t, config)
        kinds[name] = kind
    if tensors:
        save_file(tensors, str(path), metadata={"kinds": json.dumps(kinds, sort_keys=True)})
    return len(tensors)


def _save_tokenizer(gguf_path: Path, out_dir: Path, max_length: int) -> None:
    """Let transformers build the tokenizer from the GGUF metadata and save it in HF form."""
    from transformers import AutoTokenizer

    try:
        # never run code from the folder (an auto_map in a tokenizer_config.json beside it)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                            trust_remote_code=False)
    except Exception as e:
        raise GGUFConversionError(
            f"{gguf_path}: cannot build a tokenizer from the GGUF metadata ({e}); "
            "convert with tokenizer=False (--no-tokenizer) to skip it"
        ) from e
    tok.model_max_length = max_length
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():  # drop keys describing how it was loaded, not the tokenizer
        cfg = json.loads(cfg_path.read_text())
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: bool = True,
    progress: bool = True,
) -> Path:
    """Convert ``gguf_path`` (llama) into the HF-layout directory ``out_dir``; return it.

    Raises ``FileExistsError`` if ``out_dir`` exists (unless ``overwrite``; it is then replaced
    only once the new conversion is complete), :class:`GGUFConversionError` for an unsupported
    file. The finished directory holds a ``.pipespec-complete`` marker (JSON).
    """
    t0 = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if out_dir.exists():
        check_replaceable(out_dir)
    reader = _open_gguf(gguf_path)
    config, extra = config_from_gguf(reader)
    if tokenizer and "tokenizer.ggml.model" not in reader.fields:
        raise GGUFConversionError(
            f"{gguf_path}: no tokenizer metadata (tokenizer.ggml.*); "
            "convert with tokenizer=False (--no-tokenizer) to skip the tokenizer"
        )
    plan = _plan_tensors(reader, config, gguf_path)  # every tensor checked before any write
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_tmp(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_dir) + f"{os.getpid()}-",
                                dir=out_dir.parent))
    try:
        _write_configs(tmp, config, extra)
        _write_weights(tmp, reader, plan, config, gguf_path.name, progress)
        if tokenizer:
            _save_tokenizer(gguf_path, tmp, config.max_position_embeddings)
        _write_json(tmp / COMPLETE_MARKER, {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2),
        })
        _ordinary_modes(tmp)
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# What a conversion writes: ``overwrite`` replaces a folder holding only such files, never a
# folder of other things that happens to sit at the path given.
CONVERSION_FILES = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model", COMPLETE_MARKER)


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace ``out_dir`` unless it is a folder of model files (a conversion)."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a folder: not replacing it")
    for f in out_dir.iterdir():
        if f.is_dir() or not any(f.match(g) for g in CONVERSION_FILES):
            raise FileExistsError(
                f"{out_dir} holds {f.name!r}, which a conversion does not write: not replacing "
                "it (remove the folder yourself, or choose another output folder)")


def _tmp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def remove_abandoned_tmp(out_dir: Path) -> None:
    """Remove temporary folders that conversions to ``out_dir`` left when they were killed:
    each is named after the converting process, and is removed once that process is gone
    (a conversion of the default target leaves ~600 MB)."""
    prefix = _tmp_prefix(out_dir)
    for p in out_dir.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _ordinary_modes(folder: Path) -> None:
    """The published folder and its files get the modes of ordinary new files (umask applied):
    mkdtemp makes the folder private, and some writers create their files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _open_gguf(gguf_path: Path) -> Any:
    """A ``GGUFReader`` over the (little-endian) file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:
        raise GGUFConversionError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    if reader.byte_order != "I" or sys.byteorder != "little":
        raise GGUFConversionError(f"{gguf_path}: only little-endian GGUF files are supported")
    return reader


def _plan_tensors(reader: Any, config: LlamaConfig, gguf_path: Path) -> dict[str, Any]:
    """HF name -> GGUF tensor for every tensor of the file (in file order), each checked for
    a known name, a supported type and the shape ``config`` expects; none may be missing."""
    expected = config.expected_shapes()
    plan: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        name = hf_name(t.name)
        _type_info(int(t.tensor_type))
        shape = tuple(int(s) for s in reversed(t.shape))
        if name not in expected:
            raise GGUFConversionError(f"GGUF tensor {t.name} ({name}) is not in the llama layout")
        if shape != expected[name]:
            raise GGUFConversionError(
                f"GGUF tensor {t.name} ({name}) has shape {list(shape)}, "
                f"expected {list(expected[name])}"
            )
        plan[name] = t
    missing = [n for n in expected if n not in plan]
    if missing:
        raise GGUFConversionError(f"{gguf_path}: missing tensors {', '.join(missing[:8])}")
    return plan


def _write_configs(out: Path, config: LlamaConfig, extra: dict[str, Any]) -> None:
    """``config.json`` and ``generation_config.json`` (special token ids) into ``out``."""
    _write_json(out / CONFIG_FILE, config.to_hf_dict() | extra)
    gen: dict[str, Any] = {"_from_model_config": False}
    if config.bos_token_id is not None:
        gen["bos_token_id"] = config.bos_token_id
    if config.eos_token_ids:
        eos = config.eos_token_ids
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "pad_token_id" in extra:
        gen["pad_token_id"] = extra["pad_token_id"]
    _write_json(out / "generation_config.json", gen)


def _write_weights(out: Path, reader: Any, plan: dict[str, Any], config: LlamaConfig,
                   label: str, progress: bool) -> None:
    """The fp32 checkpoint (tensors in the config's order) and the packed copies into ``out``."""
    from tqdm import tqdm

    expected = config.expected_shapes()
    order = [n for n in expected if n in plan]
    with tqdm(total=len(order), desc=label, unit="tensor", disable=not progress) as bar:
        _write_safetensors(
            out / SINGLE_FILE,
            [(n, expected[n]) for n in order],
            lambda i: _hf_tensor(reader, plan[order[i]], config),
            bar.update,
        )
    _write_packed(out / PACKED_FILE, reader, plan, config)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir`` (atomic; replace an old one if asked)."""
    old: Path | None = None
    if overwrite and out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if old is not None:
            os.rename(old, out_dir)
        elif out_dir.exists():  # another process published first
            raise FileExistsError(f"{out_dir} already exists") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path, help="llama GGUF file")
    p.add_argument("out_dir", type=Path, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer files")
    args = p.parse_args(argv)
    out = convert_gguf(
        args.gguf, args.out_dir, overwrite=args.overwrite, tokenizer=not args.no_tokenizer
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
