"""The CPU fast path's state beside a model's fp32 weights: packed weight copies and the fused
layer tables.

A checkpoint may store matrices more compactly than fp32: an fp16 draft, or the ggml Q4_1 / Q8_0
blocks of a converted GGUF (``checkpoint.load_packed`` reads both). The packed-weight kernel
(:mod:`pipespec_fast.cpu.quant`) dequantises such rows in registers with the converter's exact
roundings, so a matmul on the packed copy gives the fp32 weights' values while reading up to
6.4x fewer bytes: on a memory-bound decode step that is the speed. The copy sits beside the fp32
weight as ``Linear.packed`` (the fp32 weight stays: the torch layers, long prefills and every
non-CPU path use it).

The model fuses some HF tensors into one matmul (QKV, gate/up: ``llama.LAYER_PARAMS``); such a
matmul gets a packed copy only when every part is packed alike. A packed file that does not
belong to the weights beside it would silently compute with other weights, so each attached copy
is checked against the fp32 rows it replaces.

The fused layer stack (:mod:`pipespec_fast.cpu.decoder`) runs every layer in one C call from a
table of pointers to these weights, packed or fp32 (``model._plan``: both tables, built on
first use). Copies and tables point at the weights they were made from, so new weights, a
dtype or a device change drop them (:func:`drop_fast_path`).
"""

from __future__ import annotations

import torch

from pipespec_fast.cpu.linear import Linear
from pipespec_fast.cpu.quant import PackedWeight
from pipespec_fast.models import hf_names

__all__ = ["PACKED_MAX_BLOCK", "attach_packed", "drop_fast_path", "fused_plan", "packed_bytes"]

PACKED_MAX_BLOCK = 64
"""Blocks of more tokens (a prompt's prefill) run on the fp32 weights even when packed copies
exist: the product is then compute-bound and the packed kernel's in-register dequantisation
costs more than the bytes it saves (measured: 160 tokens 194 ms vs 248 ms on 2 threads).
Verification blocks are smaller (``FastPipeline`` windows are at most 48), so every generated
token sees the packed path, decoded or verified alike."""


def attach_packed(model, packed: dict[str, PackedWeight], source: str = "checkpoint") -> int:
    """Give ``model``'s matmuls packed copies of their weights (HF name -> ``PackedWeight``).

    The tied head uses the embedding's copy (its subset rows). Raises ``ValueError`` naming
    the tensor when a copy's shape or values differ from the fp32 weight. Returns the number
    of matmuls attached.
    """
    plan = [(mod, names, _join(packed, names)) for mod, names in _matmuls(model)]
    head = hf_names.EMBED if model.config.tie_word_embeddings else hf_names.HEAD
    head_pw = _join(packed, [head])
    if head_pw is not None and model.config.vocab_subset is not None and \
            model.config.tie_word_embeddings:
        head_pw = head_pw.rows(slice(0, model.config.vocab_subset))
    plan.append((model.output, [head], head_pw))
    count = 0
    for mod, names, pw in plan:
        if pw is None:
            continue
        _check(mod.weight, names, pw, _probe_rows(packed, names, model.config.head_dim), source)
        mod.packed = pw
        count += 1
    model._plan = None
    return count


def packed_bytes(model) -> int:
    """Bytes held by ``model``'s packed copies (0 when none are attached)."""
    return sum(m.packed.nbytes() for m in model.modules()
               if isinstance(m, Linear) and m.packed is not None)


def drop_fast_path(model) -> None:
    """Forget ``model``'s packed copies and fused tables (its weights changed)."""
    model._plan = None
    for m in model.modules():
        if isinstance(m, Linear):
            m.packed = None


def fused_plan(model, x: torch.Tensor, cache, n: int):
    """The fused layer table for a block of ``n`` tokens (``x: [n, dim]``), or ``None`` where
    the fused path does not apply: it needs fp32 weights, activations and cache on CPU, and
    ``model.use_fused`` (default on; turned off here for good when the C code cannot run).
    Blocks over :data:`PACKED_MAX_BLOCK` get the table on the fp32 weights."""
    if not model.use_fused or x.dtype != torch.float32 or x.device.type != "cpu" or \
            cache.k.dtype != torch.float32 or cache.k.device.type != "cpu" or \
            model.tok_embeddings.weight.dtype != torch.float32:
        return None
    if model._plan is None:
        from pipespec_fast.cpu import decoder as cpu_decoder

        if not cpu_decoder.available():
            model.use_fused = False
            return None
        model._plan = (cpu_decoder.DecoderPlan(model),
                       cpu_decoder.DecoderPlan(model, use_packed=False))
    return model._plan[1 if n > PACKED_MAX_BLOCK else 0]


def _matmuls(model) -> list[tuple[Linear, list[str]]]:
    """Every layer matmul of ``model`` with the full HF names of the tensors it fuses."""
    from pipespec_fast.models.llama import LAYER_PARAMS

    out = []
    for i, layer in enumerate(model.layers):
        for path, parts in LAYER_PARAMS.items():
            mod = layer.get_submodule(path)
            if isinstance(mod, Linear):
                out.append((mod, [hf_names.layer(i, p) for p in parts]))
    return out


def _join(packed: dict[str, PackedWeight], names: list[str]) -> PackedWeight | None:
    """The packed parts of one fused matmul stacked by rows, or ``None`` unless every part is
    packed with the same kind and row length."""
    parts = [packed.get(n) for n in names]
    if any(p is None for p in parts) or len({(p.kind, p.k) for p in parts}) != 1:
        return None
    if len(parts) == 1:
        return parts[0]
    return PackedWeight(torch.cat([p.data for p in parts]), parts[0].kind, parts[0].k)


def _probe_rows(packed: dict[str, PackedWeight], names: list[str], head_dim: int) -> list[int]:
    """Rows to compare per part: first, last, a few inside (the q/k un-permutation moves rows
    inside a head; the ends of a part are its fixed points)."""
    rows, off = [], 0
    for name in names:
        r = packed[name].m
        rows += sorted({off, off + r - 1, off + r // 2, off + min(r - 1, head_dim // 2 + 1),
                        off + (r * 7) // 13})
        off += r
    return rows


def _check(w: torch.Tensor, names: list[str], pw: PackedWeight, probe: list[int],
           source: str) -> None:
    """Raise ``ValueError`` unless ``pw`` has the shape of ``w: [m, k]`` and its ``probe`` rows
    dequantise to ``w``'s exactly."""
    what = "+".join(names)
    if pw.shape != tuple(w.shape):
        raise ValueError(f"{source}: packed {what} has shape {pw.shape}, "
                         f"the model's weight {tuple(w.shape)}")
    rows = [r for r in probe if r < w.shape[0]]
    if not torch.equal(pw.rows(rows).dequantize(), w.detach()[rows].float().cpu()):
        raise ValueError(f"{source}: packed {what} does not hold the checkpoint's weights "
                         "(values differ)")
