"""int8-activation matmuls on packed Q4_1 / Q8_0 weights (``csrc/int8_gemm.c``).

Why: with the target's weights packed, a CPU forward is bound by its fp32 FMAs, so verifying
``n`` drafted tokens costs about ``n`` one-token forwards and speculation cannot pay. Quantising
the activations to int8 per 32-value block (ggml's Q8_0/Q8_1 scheme, with fp32 scales) turns
each block's 32 products into one exact integer dot product, which AVX-512 VNNI computes at 4x
the multiply-adds per cycle of fp32 FMAs. This is a different arithmetic from the packed fp32
kernel (:mod:`pipespec_fast.cpu.quant`): close to it (the activations carry ~0.4% rounding
noise per block), not equal to it. Its contract is exact, though:

* every path (AVX-512 VNNI, AVX2, portable C) gives the same bits, and row ``i`` of a block of
  ``n`` rows equals the 1-row product of ``x[i]`` bit for bit, whatever ``n``, the thread count
  or the split (batch invariance), so greedy speculative decoding in this mode reproduces the
  same mode's greedy decoding;
* :mod:`pipespec_fast.cpu.int8_reference` states the arithmetic in torch (the activation
  quantiser bit for bit, the products as a float64 oracle within a stated rounding bound).

:func:`int8_linear` runs it where it applies (the C library loaded, a Q4_1 or Q8_0 weight) and
otherwise falls back to the exact packed product (:func:`quant.packed_linear`: F16 weights, no
library). ``PIPESPEC_INT8_ISA`` (``RuntimeConfig.int8_isa``) or :func:`set_isa` picks the path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from pipespec_fast.cpu import library, quant
from pipespec_fast.cpu.quant import Q4_1, Q8_0, PackedWeight

QK = 32  # values per activation block (INT8_QK)
KINDS = (Q4_1, Q8_0)  # weight formats the int8 kernel takes
XBLOCK_FIELDS = ("d", "ds", "sum", "off")  # int8_xblock_t: float, float, int32, int32


@dataclass
class QuantizedRows:
    """``n`` activation rows quantised as the kernel does (``int8_quantize_rows``).

    ``q``: ``[n, k]`` int8 in [-127, 127]; ``blocks``: ``[n, k / 32, 4]`` int32, the raw
    ``int8_xblock_t`` words (:meth:`d`, :meth:`ds`, :meth:`sums`, :meth:`off` read them).
    """

    q: torch.Tensor
    blocks: torch.Tensor

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def d(self) -> torch.Tensor:
        """Block scales ``fl(amax / 127)``, fp32 ``[n, k / 32]``."""
        return self.blocks[..., 0].contiguous().view(torch.float32)

    def ds(self) -> torch.Tensor:
        """``fl(d * sum)``, fp32 ``[n, k / 32]`` (the Q4_1 min term's factor)."""
        return self.blocks[..., 1].contiguous().view(torch.float32)

    def sums(self) -> torch.Tensor:
        """Sums of the 32 int8 values, int32 ``[n, k / 32]``."""
        return self.blocks[..., 2]

    def off(self) -> torch.Tensor:
        """``-128 * sum``, int32 ``[n, k / 32]`` (the VNNI path's Q8_0 compensation)."""
        return self.blocks[..., 3]


def available() -> bool:
    """Whether the int8 kernel runs here (the C library loaded; every CPU it loads on has a
    path: VNNI, AVX2 or portable C)."""
    return library.load() is not None


def supports(w: PackedWeight) -> bool:
    """Whether :func:`int8_linear` computes ``w`` in int8 here (else it runs the exact path)."""
    return available() and w.kind in KINDS


def isa() -> str | None:
    """The path in use: ``"avx512vnni"``, ``"avx2"`` or ``"scalar"`` (``None``: no library)."""
    lib = library.load()
    return None if lib is None else library.INT8_ISA_NAMES.get(lib.int8_gemm_get_isa())


def set_isa(name: str) -> str | None:
    """Select the path (``"auto"`` or a name :func:`isa` returns; the best available if the CPU
    lacks the one asked for); returns the path now in use. Process-wide; for tests and
    benchmarks. Every path gives the same bits."""
    lib = library.load()
    if lib is None:
        return None
    if name not in library.INT8_ISA_CODES:
        raise ValueError(f"int8 isa: expected one of {', '.join(library.INT8_ISA_CODES)}, "
                         f"got {name!r}")
    return library.INT8_ISA_NAMES.get(lib.int8_gemm_set_isa(library.INT8_ISA_CODES[name]))


def _check_x(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: x must be [n, {k}], got {shape}")
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"{what}: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < k):
        x = x.contiguous()
    return x


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """Quantise ``x: [n, k]`` fp32 (``k % 32 == 0``) with the kernel's quantiser."""
    k = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
    if k % QK:
        raise ValueError(f"quantize_rows: x must be [n, k] with k % {QK} == 0, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
    x = _check_x(x, k, "quantize_rows")
    lib = library.load()
    if lib is None:
        raise RuntimeError(f"quantize_rows: C library unavailable ({library.unavailable_reason()})")
    n, k = x.shape
    q = torch.empty((n, k), dtype=torch.int8)
    blocks = torch.empty((n, k // QK, 4), dtype=torch.int32)
    if n and k:
        lib.int8_quantize_rows(_ptr(x), n, k, x.stride(0) if n > 1 else k, _ptr(q), _ptr(blocks))
    return QuantizedRows(q, blocks)


def _check_w(w: PackedWeight, what: str) -> None:
    if not isinstance(w, PackedWeight):
        raise TypeError(f"{what}: w must be a PackedWeight, got {type(w).__name__}")


def int8_linear(x: torch.Tensor, w: PackedWeight, threads: int = 1) -> torch.Tensor:
    """``x: [n, k]`` fp32 CPU -> ``[n, m]`` fp32: ``x @ W.T`` with ``x`` quantised per 32-value
    block to int8 (the module docstring's contract; batch invariant, the same bits on every
    path). ``threads`` pool threads split the output columns (the result does not depend on it).

    Where :func:`supports` is ``False`` (an F16 weight, no C library) it returns the exact
    packed product :func:`quant.packed_linear` instead.
    """
    _check_w(w, "int8_linear")
    x = _check_x(x, w.k, "int8_linear")
    if not supports(w):
        return quant.packed_linear(x, w, threads)
    n = x.shape[0]
    y = torch.empty((n, w.m), dtype=torch.float32)
    if n and w.m:
        rc = library.load().int8_gemm_f32(_ptr(x), _ptr(w.data), _ptr(y), n, w.k, w.m,
                                          x.stride(0) if n > 1 else w.k, w.kind,
                                          max(1, int(threads)))
        if rc != 0:
            raise RuntimeError(f"int8_gemm_f32 failed ({rc}) for {quant.KIND_NAMES[w.kind]} "
                               f"k={w.k}")
    return y


def int8_linear_quantized(xq: QuantizedRows, w: PackedWeight, threads: int = 1) -> torch.Tensor:
    """The same product from rows already quantised by :func:`quantize_rows` (one quantisation
    shared by the matmuls of one input, as QKV or gate/up do)."""
    _check_w(w, "int8_linear_quantized")
    if not isinstance(xq, QuantizedRows) or xq.k != w.k:
        raise ValueError(f"int8_linear_quantized: rows of k={getattr(xq, 'k', None)} for a "
                         f"weight of k={w.k}")
    if w.kind not in KINDS:
        raise ValueError(f"int8_linear_quantized: {quant.KIND_NAMES[w.kind]} weights have no "
                         "int8 path")
    lib = library.load()
    if lib is None:
        raise RuntimeError("int8_linear_quantized: C library unavailable "
                           f"({library.unavailable_reason()})")
    q, blocks = xq.q.contiguous(), xq.blocks.contiguous()  # held until the call returns
    if q.dtype != torch.int8 or blocks.dtype != torch.int32 or \
            tuple(blocks.shape) != (xq.n, xq.k // QK, 4):
        raise ValueError("int8_linear_quantized: rows not as quantize_rows makes them")
    y = torch.empty((xq.n, w.m), dtype=torch.float32)
    if xq.n and w.m:
        rc = lib.int8_gemm_q(_ptr(q), _ptr(blocks), _ptr(w.data), _ptr(y), xq.n, w.k, w.m,
                             w.kind, max(1, int(threads)))
        if rc != 0:
            raise RuntimeError(f"int8_gemm_q failed ({rc})")
    return y
