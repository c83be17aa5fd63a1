"""All decoder layers of a CPU fp32 LLaMA forward in one C call (``csrc/cpu_decoder.c``).

For a 135M model, Python and per-op dispatch cost about as much as the arithmetic of a decode
step; this path runs RMSNorm, the matmuls (fp32 skinny GEMM or packed weights), RoPE, the KV
append, verification attention (chains and trees, by ancestor bitmask), SiLU and the residuals
of every layer in one call that releases the GIL. Same contract and results (to float rounding)
as ``models.llama.Block`` with ``pipespec_fast.reference.verify_attention``, which remain the
reference; it is batch invariant (a verified token gets, bit for bit, the hidden state decoding
it alone gives). In the int8 compute mode
(``models.packed.set_compute``) the products on Q4_1 / Q8_0 rows run the int8 GEMM instead,
batch invariant too. ``PIPESPEC_FUSED=0`` (``RuntimeConfig.fused``) turns it off. The call's
signature and the layer table's struct are declared in :mod:`pipespec_fast.cpu.library`.
"""

from __future__ import annotations

import ctypes

import torch

from pipespec_fast import config, validate
from pipespec_fast.cpu import library

__all__ = ["DecoderPlan", "available"]

# DECODER_* return codes of csrc/cpu_decoder.h
_ERRORS = {-1: "out of memory",
           -2: "packed weights the kernel refuses (unknown kind, k not a multiple of its block, "
               "or a CPU without AVX-512F/F16C)",
           -3: "unsupported shape"}


def available() -> bool:
    """Whether the fused path can run here (C library built, avx2/fma; not disabled)."""
    if not config.current().fused:
        return False
    lib = library.load()
    return lib is not None and bool(lib.decoder_supported())


class DecoderPlan:
    """The layer table of one model for :func:`decoder_layers_f32` (weights pointed to, not
    copied; rebuild it when the model's weights change): packed copies where the model has
    them, for every block size (the packed GEMM has a path for long blocks). ``use_packed=False``:
    the fp32 weights even where packed copies exist (a model that still holds them: e.g.
    attached with ``keep_fp32=True``; for comparisons). ``compute`` (default: the model's
    ``compute``, ``"exact"`` if it has none): ``"int8"`` runs the Q4_1 / Q8_0 packed matrices
    through the int8 GEMM, each product's input rows quantised once (``csrc/cpu_decoder.h``)."""

    def __init__(self, model, use_packed: bool = True, compute: str | None = None) -> None:
        from pipespec_fast.cpu import quant

        mode = validate.compute(compute or getattr(model, "compute", "exact"))
        self.compute = mode

        use_packed = use_packed and quant.available()  # packed kinds need AVX-512F/F16C
        cfg = model.config
        self.n_layers = cfg.n_layers
        self.dims = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self._keep: list[torch.Tensor] = []  # everything the table points into
        table = (library.DecoderLayer * cfg.n_layers)()
        for i, layer in enumerate(model.layers):
            row = table[i]
            row.attn_norm = self._ptr(layer.attention_norm.weight)
            row.ffn_norm = self._ptr(layer.ffn_norm.weight)
            row.compute = library.DECODER_COMPUTE[mode]
            mats = (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                    layer.feed_forward.w2)
            for j, mod in enumerate(mats):
                pw = (mod.packed_int8 if mode == "int8" else None) or mod.packed
                if use_packed and pw is not None:
                    row.w[j], row.kind[j] = self._ptr(pw.data), pw.kind
                elif mod.weight.is_meta:
                    raise ValueError(
                        f"DecoderPlan: layer {i}'s {type(mod).__name__} {tuple(mod.weight.shape)}"
                        " is held only in packed form (fp32 copy dropped at load), and "
                        + ("use_packed=False" if not use_packed and mod.packed is not None
                           else "the packed kernel does not run here")
                        + "; load the model with packed=False or call materialize_fp32()")
                else:
                    row.w[j], row.kind[j] = self._ptr(mod.weight), 0
        self.table = table

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.detach()
        if t.device.type != "cpu" or not t.is_contiguous() or \
                t.dtype not in (torch.float32, torch.uint8):
            raise ValueError("DecoderPlan: weights must be contiguous fp32 (or packed) on CPU")
        self._keep.append(t)
        return t.data_ptr()

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, threads: int) -> None:
        """Every layer on ``x: [n, dim]`` (contiguous fp32, **in place**); ``cos, sin:
        [n, head_dim]``; ``bits: [n, words]`` int32; caches ``[n_layers, kv_heads, max_len,
        head_dim]`` fp32 contiguous, slots ``[start, start + n)`` written."""
        n = x.shape[0]
        dim, n_heads, n_kv, hd, inter = self.dims
        for t in (x, cos, sin, bits, k_cache, v_cache):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("DecoderPlan.run: tensors must be contiguous and on CPU")
        if any(t.dtype != torch.float32 for t in (x, cos, sin, k_cache, v_cache)) or \
                bits.dtype != torch.int32:
            raise TypeError("DecoderPlan.run: fp32 activations, tables and caches, int32 bits")
        max_len = k_cache.shape[2] if k_cache.dim() == 4 else -1
        cache_shape = (self.n_layers, n_kv, max_len, hd)
        if tuple(x.shape) != (n, dim) or tuple(cos.shape) != (n, hd) or \
                tuple(sin.shape) != (n, hd) or bits.dim() != 2 or bits.shape[0] != n or \
                bits.shape[1] < (n + 31) // 32 or tuple(k_cache.shape) != cache_shape or \
                tuple(v_cache.shape) != cache_shape:
            raise ValueError(
                f"DecoderPlan.run: shape mismatch (x {tuple(x.shape)}, cos/sin "
                f"{tuple(cos.shape)}/{tuple(sin.shape)}, bits {tuple(bits.shape)}, caches "
                f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)}; the model needs x [n, {dim}], "
                f"tables [n, {hd}], caches [{self.n_layers}, {n_kv}, max_len, {hd}])")
        if not 0 <= start <= max_len - n:
            raise ValueError(f"DecoderPlan.run: slots [{start}, {start + n}) outside the cache "
                             f"of {max_len}")
        rc = library.load().decoder_layers_f32(
            ctypes.addressof(self.table), self.n_layers, x.data_ptr(), n, dim, n_heads, n_kv,
            hd, inter, self.eps, cos.data_ptr(), sin.data_ptr(), bits.data_ptr(), bits.shape[1],
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), max_len, start,
            max(1, int(threads)))
        if rc != 0:
            raise RuntimeError(f"decoder_layers_f32 failed: {_ERRORS.get(rc, rc)}")
