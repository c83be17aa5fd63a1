"""The CPU fast path's weights: packed matrices in place of fp32 ones, and the fused layer table.

A checkpoint may store matrices more compactly than fp32: an fp16 draft, or the ggml Q4_1 / Q8_0
blocks of a converted GGUF (``checkpoint.load_packed`` reads both). The packed-weight kernel
(:mod:`pipespec_fast.cpu.quant`) dequantises such rows in registers with the converter's exact
roundings, so a matmul on the packed copy gives the fp32 weights' values while reading up to
6.4x fewer bytes: on a memory-bound decode step that is the speed. Long blocks (prefills) take
the kernel's panel path, which dequantises a few weight rows at a time into a small fp32 panel
and reuses it for many rows of x, as fast as an fp32 GEMM; so nothing needs the fp32 matrices.

**One copy of each matrix.** Once a packed copy is attached and checked, the model holds no fp32
copy of that matrix: its ``weight`` becomes a placeholder on the meta device (shape and dtype
kept, no memory), and the matrix lives only in ``Linear.packed`` (``Embedding.packed`` for the
token embedding, which a tied head shares). :meth:`Transformer.from_pretrained` never even
reads those fp32 tensors: it checks the packed copies against a few rows read from the
checkpoint alone (:func:`covered_names`, :func:`probe_rows`,
``checkpoint.load_rows``). The default target then takes ~96 MB instead of ~610 MB.

What still wants the fp32 values gets them by dequantising on demand, which is exact (the packed
rows are the converted checkpoint's fp32 values, bit for bit):

* the torch layers (``use_fused=False``, the reference the C stack is tested against) call
  ``Linear``, which runs the packed kernel for fp32 CPU inputs;
* the embedding lookup dequantises the rows it gathers;
* ``state_dict()`` dequantises the dropped matrices;
* a conversion off CPU fp32 (``model.to(...)``), new weights (``load_state_dict``) or
  :func:`materialize` restore the fp32 matrices first (and the conversion drops the packed
  copies, as before).

A ``Linear`` asked for a product the packed kernel cannot give (an input that is not fp32 on
CPU) refuses with an error naming the way out (``packed=False`` at load, or
:func:`materialize`). To compare against dense fp32 weights, load the model with
``packed=False`` (what the tests' reference models do) or attach with ``keep_fp32=True``.

The model fuses some HF tensors into one matmul (QKV, gate/up: ``llama.LAYER_PARAMS``); such a
matmul gets a packed copy only when every part is packed alike. A packed file that does not
belong to the weights beside it would silently compute with other weights, so each attached
copy is checked against fp32 rows of the tensors it replaces (:func:`probe_rows`: the ends and a
few rows inside each part, where a left-over llama.cpp q/k permutation would show).

The fused layer stack (:mod:`pipespec_fast.cpu.decoder`) runs every layer in one C call from one
table of pointers to these weights, packed where a copy exists, for every block size
(``model._plan``, built on first use). Tables point at the weights they were made from, so new
weights, a dtype or a device change drop them (:func:`drop_fast_path`).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Mapping

import torch
from torch import nn

from pipespec_fast import validate
from pipespec_fast.cpu import quant
from pipespec_fast.cpu.linear import Linear
from pipespec_fast.cpu.quant import PackedWeight
from pipespec_fast.models import hf_names

__all__ = ["attach_loaded", "attach_packed", "converting", "covered_names", "default_compute",
           "default_modes", "drop_fast_path", "fused_plan", "has_dropped", "materialize",
           "packed_bytes", "probe_rows", "requantize_fp16", "set_compute"]


def attach_packed(model, packed: dict[str, PackedWeight], source: str = "checkpoint",
                  reference: Mapping[str, torch.Tensor] | None = None,
                  keep_fp32: bool = False, consume: bool = False) -> int:
    """Give ``model``'s matmuls (and its embedding) packed copies of their weights (HF name ->
    ``PackedWeight``), then drop the fp32 matrices they replace.

    Each copy is checked first: its shape against the model's, and :func:`probe_rows` of every
    part against ``reference`` (HF name -> those rows in fp32, e.g. read from the checkpoint
    by ``checkpoint.load_rows``; default: the model's own fp32 weights). ``ValueError`` names
    the tensor when they differ. The fp32 matrices are kept when ``keep_fp32`` or when the
    packed kernel does not run here (the fused layers would need them). Returns the number of
    matmuls attached.

    ``consume=True`` (a ``packed`` the caller hands over, as :func:`attach_loaded` does): no
    copy of a single part, and each entry of ``packed`` is rebound to a view of the joined copy
    it went into, so the parts' own memory is freed as loading goes instead of doubling it.
    """
    emb_pw = _join(packed, [hf_names.EMBED], consume=consume)
    plan = _attach_plan(model, packed, emb_pw, consume)
    checks = [(tuple(mod.weight.shape), names, pw) for mod, names, pw in plan]
    if emb_pw is not None:
        checks.append((tuple(model.tok_embeddings.weight.shape), [hf_names.EMBED], emb_pw))
    for shape, names, pw in checks:
        if pw.shape != shape:
            raise ValueError(f"{source}: packed {'+'.join(names)} has shape {pw.shape}, "
                             f"the model's weight {shape}")
    if reference is None:
        reference = _model_reference(model, plan, emb_pw, packed)
    for _, names, _ in checks:
        _check_values(names, packed, reference, model.config.head_dim, source)
    for mod, _, pw in plan:
        mod.packed = pw
    model.tok_embeddings.packed = emb_pw
    model._plan = None
    if not keep_fp32 and quant.available():
        _drop_fp32(model)
    return len(plan)


def covered_names(config, packed: Mapping[str, PackedWeight]) -> set[str]:
    """The HF tensors whose fp32 values :func:`attach_packed` would replace by ``packed``'s
    copies on a model of ``config`` (what loading need not read): the parts of every matmul
    packed whole, and the embedding (with a tied head) where it is packed."""
    from pipespec_fast.models.llama import LAYER_PARAMS

    out: set[str] = set()
    for i in range(config.n_layers):
        for parts in LAYER_PARAMS.values():
            names = [hf_names.layer(i, p) for p in parts]
            if _join(packed, names, copy=False) is not None:
                out.update(names)
    for name in (hf_names.EMBED, hf_names.HEAD):
        if name in packed and not (name == hf_names.HEAD and config.tie_word_embeddings):
            out.add(name)
    return out


def probe_rows(rows: int, head_dim: int) -> list[int]:
    """Rows of an ``rows``-row tensor a packed copy is checked on: first, last, a few inside
    (the q/k un-permutation moves rows inside a head; the ends of a part are its fixed
    points)."""
    return sorted({0, rows - 1, rows // 2, min(rows - 1, head_dim // 2 + 1), (rows * 7) // 13})


def packed_bytes(model) -> int:
    """Bytes held by ``model``'s packed copies (0 when none are attached; a copy shared by the
    embedding and a tied head counts once)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        pw = getattr(m, "packed", None)
        if isinstance(pw, PackedWeight):
            seen[pw.data.untyped_storage().data_ptr()] = pw.data.untyped_storage().nbytes()
    return sum(seen.values())


def has_dropped(model) -> bool:
    """Whether some matrix of ``model`` is held only in packed form (fp32 copy dropped)."""
    return any(p.is_meta for p in model.parameters())


def materialize(model) -> None:
    """Give every matrix held only in packed form its fp32 weight back (dequantised: the same
    values, bit for bit); the packed copies stay."""
    emb = model.tok_embeddings
    if emb.weight.is_meta and emb.packed is not None:
        emb.weight = nn.Parameter(emb.packed.dequantize(), requires_grad=False)
        model._tie_output()
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.is_meta and m.packed is not None:
            m.weight = nn.Parameter(m.packed.dequantize(), requires_grad=False)
    model._plan = None


def drop_fast_path(model) -> None:
    """Forget ``model``'s packed copies and fused table (its weights change), restoring first
    any fp32 matrix that only a packed copy held."""
    materialize(model)
    model._plan = None
    model.tok_embeddings.packed = None
    for m in model.modules():
        if isinstance(m, Linear):
            m.packed = None


def attach_loaded(model, model_dir, packed: dict[str, PackedWeight], covered: set[str],
                  ) -> int:
    """:func:`attach_packed` for a model whose ``covered`` matrices were never loaded (meta
    placeholders): the copies are checked against their :func:`probe_rows` read from the
    checkpoint in ``model_dir`` alone."""
    from pipespec_fast.models.checkpoint import load_rows

    hd = model.config.head_dim
    reference = load_rows(model_dir, {n: probe_rows(packed[n].m, hd) for n in sorted(covered)},
                          model.norm.weight.dtype)
    return attach_packed(model, packed, str(model_dir), reference, consume=True)


@contextlib.contextmanager
def converting(model, fn):
    """Around ``nn.Module._apply(fn)`` on a model that may hold matrices only in packed form:
    a conversion that keeps it on CPU fp32 (``.float()``, ``.to("cpu")``) passes their meta
    placeholders by (unregistered meanwhile); any other restores their fp32 values first
    (:func:`materialize`; the model then drops its packed copies, which serve CPU fp32 only)."""
    hidden = []
    if has_dropped(model):
        probe = fn(torch.zeros(1))
        if probe.dtype != torch.float32 or probe.device.type != "cpu":
            materialize(model)
        else:
            for m in model.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_meta:
                        hidden.append((m, name, p))
                        m._parameters[name] = None
    try:
        yield
    finally:
        for m, name, p in hidden:
            m._parameters[name] = p


def set_compute(model, mode: str) -> None:
    """Choose how ``model``'s products on packed weights are computed, in the fused layers and
    the head alike (``pipespec_fast.validate.COMPUTE_MODES``): ``"exact"`` (the converted
    checkpoint's fp32 arithmetic) or ``"int8"`` (activations quantised per 32-value block,
    integer block dots; batch invariant too). In int8 mode a matrix stored in fp16 (a draft's)
    gets a Q8_0 copy beside it (``Linear.packed_int8``, ~0.53x its bytes; freed again in
    exact mode), so it runs through the int8 GEMM as well: a draft's values change by the
    Q8_0 rounding, which only moves its proposals (the verifier decides what is output).
    fp32 matrices stay exact either way. The fused table is rebuilt on next use."""
    model.compute = validate.compute(mode)
    for m in model.modules():
        if isinstance(m, Linear):
            m.compute = mode
            m.packed_int8 = _q8_0_copy(m.packed) if mode == "int8" else None
    model._plan = None


def _q8_0_copy(pw: PackedWeight | None) -> PackedWeight | None:
    """A Q8_0 copy of an fp16 packed matrix (per 32 values: absmax / 127 scale, round half to
    even), or ``None`` for any other (Q4_1 / Q8_0 run the int8 GEMM as they are)."""
    if pw is None or pw.kind != quant.F16 or pw.k % 32:
        return None
    out = torch.empty((pw.m, quant.row_bytes(quant.Q8_0, pw.k)), dtype=torch.uint8)
    for r in range(0, pw.m, 512):  # in row chunks: no full fp32 copy, even transiently
        out[r:r + 512] = quant.quantize(pw.rows(slice(r, r + 512)).dequantize(), quant.Q8_0)
    return PackedWeight(out, quant.Q8_0, pw.k)


def requantize_fp16(model) -> int:
    """Replace each fp16 packed matrix that ``model`` holds only in packed form (its fp32 copy
    dropped) by its Q8_0 blocks (:func:`_q8_0_copy`), the embedding included, a tied head
    then sharing the new embedding's rows: ~0.53x the bytes, and no fp16 copy kept beside an
    int8 mode's Q8_0 one. The model's values become the Q8_0 values in every mode, so this is
    for drafts (their values only move proposals; the verifier decides the output):
    ``FastPipeline.from_pretrained`` does it for drafts computing in int8 (the default
    draft: 35 -> 19 MB). Returns how many matrices were replaced."""
    emb, out = model.tok_embeddings, model.output
    tied_rows = None
    count = 0
    if emb.packed is not None and emb.packed.kind == quant.F16 and emb.weight.is_meta:
        tied = model.config.tie_word_embeddings and out.packed is not None and \
            out.packed.data.untyped_storage().data_ptr() == \
            emb.packed.data.untyped_storage().data_ptr()
        emb.packed = _q8_0_copy(emb.packed)
        count += 1
        tied_rows = out.packed.m if tied else None
    for m in model.modules():
        if not isinstance(m, Linear) or m.packed is None or not m.weight.is_meta:
            continue
        if m is out and tied_rows is not None:
            m.packed = emb.packed.rows(slice(0, tied_rows))
        elif m.packed.kind == quant.F16:
            m.packed = _q8_0_copy(m.packed)
            count += 1
        m.packed_int8 = None
    model._plan = None
    return count


def default_compute(model) -> str:
    """The compute mode ``FastPipeline.from_pretrained`` gives ``model`` when none is asked for:
    ``"int8"`` if it holds a Q4_1 / Q8_0 packed matrix the int8 GEMM computes here (a converted
    GGUF on a CPU with the packed kernel and AVX-512 VNNI or AVX2, as the default target), else
    ``"exact"`` (for other models both modes are the same arithmetic; with only the portable C
    int8 path, exact is the faster one). Why int8 by default:
    on the default target its mean per-token NLL is within 0.35% of exact (the issue's bar is
    0.5%; ``bench/int8_quality.py``) and each extra verified token costs ~4x fewer cycles, the
    trade llama.cpp makes by default too."""
    from pipespec_fast.cpu import int8

    if int8.isa() not in ("avx512vnni", "avx2"):
        return "exact"  # only the portable C path: int8 would be slower, not faster
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is not None and int8.supports(m.packed):
            return "int8"
    return "exact"


def default_modes(models: list) -> list[str]:
    """The compute modes ``FastPipeline.from_pretrained`` gives a hierarchy's models (smallest
    first, the target last) when none is asked for: the target's :func:`default_compute`; a
    draft's too, except that a draft holding packed matrices of any kind follows an int8
    target into int8 (its fp16 matrices get Q8_0 copies: ~1.6x faster steps for the default
    draft, and a draft's arithmetic only moves its proposals, never the output)."""
    if not models:
        return []
    target = default_compute(models[-1])
    return [draft_compute(model, target) for model in models[:-1]] + [target]


def draft_compute(model, target_mode: str) -> str:
    """A draft's default compute mode beside a target computing in ``target_mode``
    (:func:`default_modes`; the distributed placement knows the target only by its mode)."""
    if target_mode == "int8" and any(
            isinstance(m, Linear) and m.packed is not None for m in model.modules()):
        return target_mode
    return default_compute(model)


def fused_plan(model, x: torch.Tensor, cache, n: int):
    """The fused layer table for a block of ``n`` tokens (``x: [n, dim]``, any ``n``: long
    blocks run on the packed weights too), or ``None`` where the fused path does not apply:
    it needs fp32 weights, activations and cache on CPU, and ``model.use_fused`` (default on;
    turned off here for good when the C code cannot run)."""
    if not model.use_fused or x.dtype != torch.float32 or x.device.type != "cpu" or \
            cache.k.dtype != torch.float32 or cache.k.device.type != "cpu" or \
            model.norm.weight.dtype != torch.float32:
        return None
    if model._plan is None:
        from pipespec_fast.cpu import decoder as cpu_decoder

        if not cpu_decoder.available():
            model.use_fused = False
            return None
        model._plan = cpu_decoder.DecoderPlan(model)
    return model._plan


def release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``): the fp32 matrices
    dropped after loading were freed in the middle of the heap, where ``free`` keeps them
    resident. Does nothing where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def _attach_plan(model, packed, emb_pw: PackedWeight | None, consume: bool = False,
                 ) -> list[tuple[Linear, list[str], PackedWeight]]:
    """Every matmul that gets a copy: (module, HF names of its parts, the joined copy); a
    tied head shares ``emb_pw``, the embedding's copy (its first rows for a vocab subset)."""
    plan = [(mod, names, _join(packed, names, consume=consume)) for mod, names in _matmuls(model)]
    if model.config.tie_word_embeddings:
        head, head_pw = hf_names.EMBED, emb_pw
        if head_pw is not None and model.config.vocab_subset is not None:
            head_pw = head_pw.rows(slice(0, model.config.vocab_subset))
    else:
        head, head_pw = hf_names.HEAD, _join(packed, [hf_names.HEAD], consume=consume)
    plan.append((model.output, [head], head_pw))
    return [entry for entry in plan if entry[2] is not None]


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


def _join(packed: Mapping[str, PackedWeight], names: list[str], copy: bool = True,
          consume: bool = False) -> PackedWeight | None:
    """The packed parts of one fused matmul stacked by rows, or ``None`` unless every part is
    packed with the same kind and row length. A copy that owns its memory (the caller's
    tensors may be views of anything, which the model must not keep alive); with ``consume``
    (``packed`` is a mutable dict handed over, its tensors owned: ``attach_packed``) a single
    part is taken as it is, and every part's entry becomes a view of the joined copy, which
    frees the part's memory once nothing else holds it."""
    parts = [packed.get(n) for n in names]
    if any(p is None for p in parts) or len({(p.kind, p.k) for p in parts}) != 1:
        return None
    if not copy or (consume and len(parts) == 1):
        return parts[0]
    data = parts[0].data.clone() if len(parts) == 1 else torch.cat([p.data for p in parts])
    joined = PackedWeight(data, parts[0].kind, parts[0].k)
    if consume:
        off = 0
        for name, part in zip(names, parts, strict=True):
            packed[name] = joined.rows(slice(off, off + part.m))
            off += part.m
    return joined


def _model_reference(model, plan, emb_pw, packed) -> dict[str, torch.Tensor]:
    """Probe rows of each attached tensor (HF name), read from the model's fp32 weights."""
    hd = model.config.head_dim
    sources: list[tuple[torch.Tensor, list[str]]] = [(mod.weight, names) for mod, names, _ in
                                                     plan if names[0] != hf_names.EMBED]
    if emb_pw is not None or any(names[0] == hf_names.EMBED for _, names, _ in plan):
        sources.append((model.tok_embeddings.weight, [hf_names.EMBED]))
    out = {}
    for w, names in sources:
        off = 0
        for name in names:
            r = packed[name].m
            rows = [off + i for i in probe_rows(r, hd)]
            if w.is_meta:
                raise ValueError(f"attach_packed: no fp32 rows to check packed {name} against "
                                 "(pass reference= rows read from the checkpoint)")
            out[name] = w.detach()[rows].float().cpu()
            off += r
    return out


def _check_values(names: list[str], packed: Mapping[str, PackedWeight],
                  reference: Mapping[str, torch.Tensor], head_dim: int, source: str) -> None:
    """Raise ``ValueError`` unless every part's :func:`probe_rows` dequantise to
    ``reference``'s rows exactly."""
    for name in names:
        part = packed[name]
        want = reference.get(name)
        rows = probe_rows(part.m, head_dim)
        if want is None or tuple(want.shape) != (len(rows), part.k) or \
                not torch.equal(part.rows(rows).dequantize(), want):
            raise ValueError(f"{source}: packed {'+'.join(names)} does not hold the "
                             "checkpoint's weights (values differ)")


def _drop_fp32(model) -> None:
    """Replace every fp32 matrix that a packed copy holds by a meta placeholder, then give the
    freed heap pages back."""
    def placeholder(p: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                            requires_grad=False)

    emb, out = model.tok_embeddings, model.output
    emb_dropped = emb.packed is not None and \
        (not model.config.tie_word_embeddings or out.packed is not None)
    if emb_dropped and not emb.weight.is_meta:
        emb.weight = placeholder(emb.weight)
        model._tie_output()
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is not None and not m.weight.is_meta:
            if m is out and model.config.tie_word_embeddings and not emb_dropped:
                continue  # the head shares the embedding, which stays
            m.weight = placeholder(m.weight)
    model._plan = None
    release_freed_memory()
