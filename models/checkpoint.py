"""Load and save LLaMA weights in the Hugging Face safetensors layout.

A model directory holds ``config.json`` and either one ``model.safetensors`` or shards listed
by ``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).  Loading is
two-phase: every file header is read and every tensor name, dtype and shape is checked
against :meth:`LlamaConfig.expected_shapes` first; only then are tensors materialised, so a
bad checkpoint fails with one clear :class:`CheckpointError` and nothing half-loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipespec_fast.models import hf_names
from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig, subset_ids_problem

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_INT_DTYPES = {"I64", "I32"}  # only model.vocab_subset_ids
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that should exist does not (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its header says, before any data is read."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: F32, F16, BF16, ...


def _open(path: Path):
    """``safe_open`` that names the file when the header is truncated or corrupt."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError as e:
        raise CheckpointFileNotFoundError(f"{path}: file not found") from e
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file with shape and dtype (header only, no data)."""
    out: dict[str, TensorInfo] = {}
    try:
        with _open(path) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorInfo(path, tuple(int(s) for s in sl.get_shape()), sl.get_dtype())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({e})") from e
    return out


def _fmt_list(names: Iterable[str]) -> str:
    names = sorted(names)
    head = ", ".join(names[:_MAX_LISTED])
    return head + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def scan_checkpoint(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Map every tensor of the checkpoint in ``model_dir`` to its file, shape and dtype.

    Reads headers only. ``model.safetensors`` wins over an index when both exist (as in
    ``transformers``). Raises :class:`CheckpointError` naming the file or tensor at fault.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointFileNotFoundError(f"{model_dir}: model directory not found")
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        return _read_header(single)
    if not index.is_file():
        others = sorted(p.name for p in model_dir.glob("*.safetensors"))
        hint = f" (found {', '.join(others)} but no {INDEX_FILE})" if others else ""
        if not others and any(model_dir.glob("*.bin")):
            hint = " (only PyTorch .bin files; convert them to safetensors)"
        raise CheckpointFileNotFoundError(
            f"{model_dir}: no safetensors checkpoint: expected {SINGLE_FILE} or {INDEX_FILE}{hint}"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
    shard_names = sorted(set(weight_map.values()))
    for shard in shard_names:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: invalid shard file name {shard!r}")
        if not (model_dir / shard).is_file():
            users = [n for n, s in weight_map.items() if s == shard]
            raise CheckpointFileNotFoundError(
                f"{index}: shard file {shard} is missing from {model_dir} "
                f"(it should hold {_fmt_list(users)})"
            )
    headers = {shard: _read_header(model_dir / shard) for shard in shard_names}
    out: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = headers[shard].get(name)
        if info is None:
            raise CheckpointError(
                f"{index}: maps tensor {name} to {model_dir / shard}, which does not contain it"
            )
        out[name] = info
    return out


def validate_checkpoint(
    tensors: Mapping[str, TensorInfo], config: LlamaConfig
) -> dict[str, TensorInfo]:
    """Check names, shapes and dtypes against ``config``; return the tensors to load.

    Ignores ``rotary_emb.inv_freq`` buffers and, when the embeddings are tied, a stored
    ``lm_head.weight``. Collects every problem into one :class:`CheckpointError`.
    """
    expected = config.expected_shapes()
    keep: dict[str, TensorInfo] = {}
    unexpected: list[str] = []
    for name, info in tensors.items():
        if name in expected:
            keep[name] = info
        elif hf_names.ROTARY_BUFFER.fullmatch(name) or (
                config.tie_word_embeddings and name == hf_names.HEAD):
            continue
        else:
            unexpected.append(f"{name} (in {info.file.name})")
    problems: list[str] = []
    missing = [n for n in expected if n not in tensors]
    if missing:
        problems.append(f"missing tensors: {_fmt_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt_list(unexpected)}")
        if config.vocab_subset is None and VOCAB_SUBSET_IDS in tensors:
            problems.append(f"{VOCAB_SUBSET_IDS} marks a vocabulary-subset checkpoint but "
                            "config.json has no vocab_subset_size")
    for name, info in keep.items():
        if info.shape != expected[name]:
            problems.append(
                f"tensor {name} in {info.file.name} has the wrong shape: "
                f"expected {list(expected[name])}, found {list(info.shape)}"
            )
        if name == VOCAB_SUBSET_IDS:
            if info.dtype not in _INT_DTYPES:
                problems.append(
                    f"tensor {name} in {info.file.name} has dtype {info.dtype}; "
                    f"expected an integer type ({', '.join(sorted(_INT_DTYPES))})"
                )
        elif info.dtype not in _FLOAT_DTYPES:
            problems.append(
                f"tensor {name} in {info.file.name} has dtype {info.dtype}; "
                f"expected a float type ({', '.join(sorted(_FLOAT_DTYPES))})"
            )
    if problems:
        where = next(iter(tensors.values())).file.parent if tensors else "checkpoint"
        raise CheckpointError(f"{where}: checkpoint does not match config: " + "; ".join(problems))
    return keep


def _materialize(
    plan: Mapping[str, TensorInfo], dtype: torch.dtype, device: str | torch.device,
    own: bool = False,
) -> dict[str, torch.Tensor]:
    """Read ``plan``'s tensors as ``dtype`` on ``device``. safetensors hands out views of its
    memory map where no conversion is needed, which keep the whole map (and every page read
    through it) alive; ``own=True`` copies such tensors so the map closes after loading."""

    def read(f, name: str) -> torch.Tensor:
        t = f.get_tensor(name)
        moved = t.to(device=device, dtype=torch.int64 if name == VOCAB_SUBSET_IDS else dtype)
        return moved.clone() if own and moved is t else moved

    # in config order, so that iteration is deterministic whatever the sharding
    return _read_by_file({name: info.file for name, info in plan.items()}, read, "tensor")


def _read_by_file(files: Mapping[str, Path], read, what: str) -> dict[str, torch.Tensor]:
    """``read(handle, name)`` for every ``name -> file``, each file opened once; a failure is a
    :class:`CheckpointError` naming the file and the ``what`` (tensor, rows) read. Returned in
    the order of ``files``."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                try:
                    out[name] = read(f, name)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read {what} {name} ({e})") from e
    return {name: out[name] for name in files}


def load_state_dict(
    model_dir: str | Path,
    config: LlamaConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    skip: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Load the HF-layout safetensors weights in ``model_dir`` as ``dtype`` on ``device``.

    Keys are HF names (``model.layers.0.self_attn.q_proj.weight``, ...), exactly those of
    ``config.expected_shapes()``. Every header is validated before any tensor is read;
    problems raise :class:`CheckpointError` (a ``ValueError``) naming the tensor or file.

    ``skip``: names that are validated but not read (weights the CPU engine keeps only in
    packed form: :func:`pipespec_fast.models.packed.covered_names`); the tensors returned
    then own their memory, so the checkpoint's memory map closes once loading is done
    instead of keeping every page read through it resident.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    plan = validate_checkpoint(scan_checkpoint(model_dir), config)
    order = {n: i for i, n in enumerate(config.expected_shapes())}
    plan = dict(sorted(((n, info) for n, info in plan.items() if n not in skip),
                       key=lambda kv: order[kv[0]]))
    tensors = _materialize(plan, dtype, device, own=bool(skip))
    ids = tensors.get(VOCAB_SUBSET_IDS)
    if ids is not None:
        _check_subset_ids(ids, config, plan[VOCAB_SUBSET_IDS].file)
    return tensors


def load_rows(model_dir: str | Path, rows: Mapping[str, list[int]],
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Some rows of some 2-D tensors of the checkpoint, read alone: name -> ``[len(rows), k]``
    in ``dtype`` (what a packed copy is checked against when the full fp32 weight is never
    loaded). Raises :class:`CheckpointError` naming a tensor that is missing or not 2-D."""
    infos = scan_checkpoint(model_dir)
    for name in rows:
        info = infos.get(name)
        if info is None or len(info.shape) != 2:
            raise CheckpointError(f"{model_dir}: no weight matrix {name} in the checkpoint")

    by_file: dict[Path, list[str]] = {}
    for name in rows:
        by_file.setdefault(infos[name].file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():  # plain reads: no page around a row gets mapped
        out.update((n, t.to(dtype)) for n, t in read_owned(file, names, rows).items())
    return {name: out[name] for name in rows}


PACKED_FILE = "packed.safetensors"


def load_packed(model_dir: str | Path, config: LlamaConfig) -> dict[str, Any]:
    """The weights of ``model_dir`` that the CPU engine can keep in their storage format.

    Two sources: :data:`PACKED_FILE` (ggml blocks written by ``convert_gguf``: uint8
    ``[rows, row_bytes]`` per HF name, kinds in the ``kinds`` metadata), and every 2-D weight
    the checkpoint itself stores as fp16 (packed as ``F16``). Returns HF name ->
    :class:`pipespec_fast.cpu.quant.PackedWeight` (``{}`` if none); a malformed packed file raises
    :class:`CheckpointError` naming the tensor. The caller checks the values against the fp32
    weights (:func:`pipespec_fast.models.packed.attach_packed`). The tensors own their memory
    (:func:`read_owned`: no memory map stays open behind them).
    """
    from pipespec_fast.cpu.quant import PackedWeight

    model_dir = Path(model_dir)
    expected = config.expected_shapes()
    kinds: dict[str, int] = {}
    path = model_dir / PACKED_FILE
    if path.is_file():
        kinds = _packed_kinds(path, expected)
    infos = scan_checkpoint(model_dir)
    fp16 = {n: info for n, info in infos.items()
            if info.dtype == "F16" and len(info.shape) == 2 and n not in kinds
            and n in expected and info.shape[1] % 16 == 0}
    out: dict[str, Any] = {}
    for name, t in read_owned(path, list(kinds)).items():
        out[name] = PackedWeight(t, kinds[name], expected[name][1])
    by_file: dict[Path, list[str]] = {}
    for name, info in fp16.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        for name, t in read_owned(file, names).items():
            out[name] = PackedWeight.from_half(t)
    return out


def _packed_kinds(path: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """HF name -> ggml kind of every tensor of a packed file, each checked (a weight matrix of
    this model, a known kind, uint8 rows of the kind's size) from the header alone."""
    from pipespec_fast.cpu.quant import KIND_NAMES, row_bytes

    out: dict[str, int] = {}
    with _open(path) as f:
        try:
            kinds = json.loads((f.metadata() or {}).get("kinds", "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid 'kinds' metadata ({e})") from e
        if not isinstance(kinds, dict):
            raise CheckpointError(f"{path}: 'kinds' metadata must map tensor names to "
                                  f"kinds, got {type(kinds).__name__}")
        for name in f.keys():
            shape = expected.get(name)
            kind = kinds.get(name)
            if shape is None or len(shape) != 2:
                raise CheckpointError(f"{path}: tensor {name} is not a weight matrix of "
                                      "this model")
            if kind not in KIND_NAMES:
                raise CheckpointError(f"{path}: tensor {name} has no valid kind in the "
                                      f"metadata (got {kind!r}; expected {KIND_NAMES})")
            sl = f.get_slice(name)
            dtype, got = sl.get_dtype(), [int(d) for d in sl.get_shape()]
            try:
                want = (shape[0], row_bytes(kind, shape[1]))
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {name}: {e}") from e
            if dtype != "U8" or tuple(got) != want:
                shown = _TORCH_DTYPES.get(dtype, dtype)
                raise CheckpointError(
                    f"{path}: tensor {name} is {shown} {got}; expected uint8 "
                    f"{list(want)} ({KIND_NAMES[kind]} rows of {shape[1]} values)")
            out[name] = kind
    return out


_TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16,
                 "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "I32": torch.int32, "I64": torch.int64}


def read_owned(path: Path, names: list[str], rows: Mapping[str, list[int]] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Tensors ``names`` of one safetensors file, as stored (no conversion), read with plain
    file reads into memory this process owns; for a name in ``rows``, only those rows of the
    2-D tensor (``[len(rows[name]), k]``).

    Why not ``safe_open``: it hands out views of a memory map, and every page read through a
    map stays in the process's resident set until the map closes, so keeping (or joining) the
    tensors held the file's pages *and* the copies: loading the default target peaked ~190 MB
    above what it keeps. Read this way, the file's pages stay in the page cache, outside the
    process (a few rows read through a map cost far more: each page fault maps its
    neighbours too, ~90 MB over the default target's probe rows). The header was validated by
    the caller (``safe_open``); a tensor whose byte range does not match its shape, or a row
    outside it, raises :class:`CheckpointError` naming it."""
    out: dict[str, torch.Tensor] = {}
    if not names:
        return out
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            for name in names:
                info = header[name]
                a, b = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
                if b - a != t.numel() * t.element_size():
                    raise CheckpointError(f"{path}: tensor {name} has {b - a} bytes of data "
                                          f"for its shape {info['shape']}")
                picked = None if rows is None else rows.get(name)
                if picked is None:
                    _read_into(f, 8 + n + a, t, path, name)
                    out[name] = t
                    continue
                m = t.shape[0]
                t = torch.empty(len(picked), *t.shape[1:], dtype=t.dtype)
                row = t[0].numel() * t.element_size() if len(picked) else 0
                for i, r in enumerate(picked):
                    if not 0 <= r < m:
                        raise CheckpointError(f"{path}: tensor {name} has no row {r}")
                    _read_into(f, 8 + n + a + r * row, t[i], path, name)
                out[name] = t
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read {names[0]} ... ({e})") from e
    return out


def _read_into(f, offset: int, t: torch.Tensor, path: Path, name: str) -> None:
    """Fill the contiguous tensor ``t`` with the bytes of ``f`` at ``offset``."""
    raw = t.view(-1).view(torch.uint8) if t.dim() else t.view(1).view(torch.uint8)
    f.seek(offset)
    if raw.numel() and f.readinto(raw.numpy()) != raw.numel():
        raise CheckpointError(f"{path}: tensor {name} is cut short")


def _check_subset_ids(ids: torch.Tensor, config: LlamaConfig, file: Path) -> None:
    """The subset's ids must be strictly ascending token ids of the vocabulary."""
    problem = subset_ids_problem(ids, config)
    if problem:
        raise CheckpointError(f"{file}: tensor {VOCAB_SUBSET_IDS}: {problem}")


def load_checkpoint(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """``LlamaConfig.from_dir`` then :func:`load_state_dict`."""
    config = LlamaConfig.from_dir(model_dir)
    return config, load_state_dict(model_dir, config, dtype=dtype, device=device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_state_dict(
    model_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: LlamaConfig,
    shard_size_bytes: int | None = None,
) -> list[Path]:
    """Write ``config.json`` and the tensors as HF-layout safetensors; return the files written.

    One ``model.safetensors`` unless ``shard_size_bytes`` is given and the tensors exceed it;
    then ``model-0000i-of-0000n.safetensors`` shards (each at most ``shard_size_bytes``, or a
    single larger tensor) plus ``model.safetensors.index.json``. Tensors are written as given
    (no validation, so tests can write broken checkpoints); a tied ``lm_head.weight`` sharing
    storage with the embeddings is dropped. Checkpoint files from an earlier save are removed.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    items = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    embed, head = tensors.get(hf_names.EMBED), tensors.get(hf_names.HEAD)
    if (
        config.tie_word_embeddings
        and embed is not None
        and head is not None
        and head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    ):
        del items[hf_names.HEAD]
    _remove_checkpoint_files(model_dir)
    total = sum(_nbytes(t) for t in items.values())
    if shard_size_bytes is None or total <= shard_size_bytes:
        _atomic_save(items, model_dir / SINGLE_FILE, {"format": "pt"})
        written = [model_dir / SINGLE_FILE]
    else:
        written = _save_shards(model_dir, items, shard_size_bytes)
    _atomic_write_text(model_dir / CONFIG_FILE, json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return written + [model_dir / CONFIG_FILE]


def _remove_checkpoint_files(model_dir: Path) -> None:
    """Delete the weights of an earlier save (single file, index, shards), nothing else."""
    for old in [
        model_dir / SINGLE_FILE,
        model_dir / INDEX_FILE,
        *model_dir.glob("model-*.safetensors"),
    ]:
        if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(old.name):
            old.unlink(missing_ok=True)


def _save_shards(model_dir: Path, items: dict[str, torch.Tensor], shard_size_bytes: int,
                 ) -> list[Path]:
    """Write ``items`` in order into shards of at most ``shard_size_bytes`` (a larger tensor
    gets a shard of its own) and the index that maps each tensor to its shard."""
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in items.items():
        if shards[-1] and size + _nbytes(t) > shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    n = len(shards)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        _atomic_save(shard, model_dir / fname, {"format": "pt"})
        written.append(model_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(_nbytes(t) for t in items.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write_text(model_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return written + [model_dir / INDEX_FILE]
