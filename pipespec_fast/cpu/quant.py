"""Weights kept in their storage format (fp16, or ggml's Q4_1 / Q8_0 blocks) for CPU matmuls.

A :class:`PackedWeight` holds the bytes of a ``[m, k]`` weight exactly as stored and computes
``x @ dequant(w).T`` with the C kernel in ``csrc/quant_gemm.c``, which dequantises in registers.
The dequantised values are bit-identical to the fp32 weights the converter writes (see
:func:`dequantize`, the torch reference of the same contract), so a model runs the very same
weights while reading 2x (fp16), 6.4x (Q4_1) or 3.8x (Q8_0) fewer bytes per token: CPU decoding
is bound by those bytes. Row ``i`` of a batched product equals the 1-row product bit for bit
(batch invariance, as with the fp32 skinny GEMM), so greedy verification reproduces the
model's own greedy tokens.

Layouts (little-endian, per weight row of ``k`` values; ``k % 32 == 0`` for the block kinds):

* ``F16``: ``k`` halves.
* ``Q4_1``: ``k / 32`` blocks of 20 bytes: fp16 ``d``, fp16 ``m``, 16 bytes whose low nibbles
  are values 0..15 and high nibbles values 16..31; value = ``fl(fl(q * d) + m)``.
* ``Q8_0``: ``k / 32`` blocks of 34 bytes: fp16 ``d``, 32 int8; value = ``fl(q * d)``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

F16, Q4_1, Q8_0 = 1, 2, 3  # QUANT_* in csrc/quant_gemm.h
OUT_OF_MEMORY = -2  # QUANT_OUT_OF_MEMORY
KIND_NAMES = {F16: "F16", Q4_1: "Q4_1", Q8_0: "Q8_0"}
KINDS = {v: k for k, v in KIND_NAMES.items()}
_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


def row_bytes(kind: int, k: int) -> int:
    """Bytes of one stored row of ``k`` values (``ValueError`` if ``k`` does not fit the kind)."""
    if kind == F16:
        if k % 16:
            raise ValueError(f"F16 packed rows need k % 16 == 0, got k={k}")
        return 2 * k
    if kind in _BLOCK_BYTES:
        if k % 32:
            raise ValueError(f"{KIND_NAMES[kind]} rows need k % 32 == 0, got k={k}")
        return k // 32 * _BLOCK_BYTES[kind]
    raise ValueError(f"unknown packed weight kind {kind!r} (expected one of {KIND_NAMES})")


@dataclass
class PackedWeight:
    """A ``[m, k]`` weight as stored: ``data`` is ``[m, row_bytes(kind, k)]`` uint8, CPU."""

    data: torch.Tensor
    kind: int
    k: int

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8 or self.data.dim() != 2:
            raise TypeError(f"PackedWeight data: expected 2-D uint8, got {self.data.dtype} "
                            f"{tuple(self.data.shape)}")
        want = row_bytes(self.kind, self.k)
        if self.data.shape[1] != want:
            raise ValueError(f"PackedWeight {KIND_NAMES[self.kind]} k={self.k}: rows of "
                             f"{self.data.shape[1]} bytes, expected {want}")
        self.data = self.data.contiguous()

    @property
    def m(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.k)

    @classmethod
    def from_half(cls, w: torch.Tensor) -> PackedWeight:
        """Pack an fp16 ``[m, k]`` weight (``k % 16 == 0``)."""
        if w.dtype != torch.float16 or w.dim() != 2:
            raise TypeError(f"from_half: expected a 2-D fp16 tensor, got {w.dtype}")
        m, k = w.shape
        return cls(w.detach().cpu().contiguous().view(torch.uint8).view(m, 2 * k), F16, k)

    def rows(self, index: torch.Tensor | slice) -> PackedWeight:
        """The packed weight of some rows (e.g. a vocabulary subset of a head)."""
        return PackedWeight(self.data[index], self.kind, self.k)

    def dequantize(self) -> torch.Tensor:
        """The fp32 ``[m, k]`` weight (the reference of the kernel's in-register decoding)."""
        return dequantize(self.data, self.kind, self.k)

    def nbytes(self) -> int:
        return self.data.numel()


def _halves(b: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` uint8 little-endian halves -> fp32 ``[...]``."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def dequantize(data: torch.Tensor, kind: int, k: int) -> torch.Tensor:
    """Torch reference: stored rows ``[m, row_bytes]`` uint8 -> fp32 ``[m, k]``, bit-exact."""
    m = data.shape[0]
    if kind == F16:
        return data.contiguous().view(torch.float16).view(m, k).float()
    nb = k // 32
    blocks = data.reshape(m, nb, _BLOCK_BYTES[kind])
    d = _halves(blocks[..., 0:2])[..., None]
    if kind == Q4_1:
        qs = blocks[..., 4:20]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()
        out = q * d + _halves(blocks[..., 2:4])[..., None]  # two roundings, like ggml
    elif kind == Q8_0:
        q = blocks[..., 2:34].contiguous().view(torch.int8).float()
        out = q * d
    else:
        raise ValueError(f"unknown packed weight kind {kind!r}")
    return out.reshape(m, k)


def quantize(w: torch.Tensor, kind: int) -> torch.Tensor:
    """Quantise fp32 ``[m, k]`` into stored rows of ``kind`` (min/max or absmax scaling,
    rounding half to even: ggml's layout, not bit for bit ggml's quantiser); for tests and
    tools. ``F16`` rounds to half."""
    w = w.detach().float().cpu()
    m, k = w.shape
    row_bytes(kind, k)
    if kind == F16:
        return w.half().contiguous().view(torch.uint8).view(m, 2 * k)
    blk = w.reshape(m, k // 32, 32)
    if kind == Q4_1:
        lo, hi = blk.amin(-1), blk.amax(-1)
        d = ((hi - lo) / 15).half()
        mn = lo.half()
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(lo))
        q = ((blk - mn.float()[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        head = torch.stack((d, mn), -1).view(torch.uint8).reshape(m, k // 32, 4)
        out = torch.cat((head, packed), -1)
    elif kind == Q8_0:
        amax = blk.abs().amax(-1)
        d = (amax / 127).half()
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(amax))
        q = (blk * inv[..., None]).round().clamp(-128, 127).to(torch.int8).view(torch.uint8)
        out = torch.cat((d[..., None].view(torch.uint8).reshape(m, k // 32, 2), q), -1)
    else:
        raise ValueError(f"unknown packed weight kind {kind!r}")
    return out.reshape(m, -1).contiguous()


_supported: bool | None = None


def available() -> bool:
    """Whether the packed-weight kernel runs here (the C library built, and AVX-512F, FMA and
    F16C on this CPU)."""
    global _supported
    if _supported is None:
        from pipespec_fast.cpu import library

        lib = library.load()
        _supported = bool(lib is not None and lib.quant_gemm_supported())
    return _supported


def packed_linear(x: torch.Tensor, w: PackedWeight, threads: int = 1) -> torch.Tensor:
    """``x: [n, k]`` fp32 CPU -> ``x @ w.dequantize().T`` ``[n, m]`` fp32 (batch invariant).

    Falls back to the torch reference (:func:`dequantize` + matmul) when the kernel is not
    :func:`available`.
    """
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"packed_linear: shapes {tuple(x.shape)} @ {w.shape}.T")
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError("packed_linear: x must be a float32 CPU tensor")
    if not available():
        return x @ w.dequantize().T
    from pipespec_fast.cpu import library

    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < w.k):
        x = x.contiguous()
    n = x.shape[0]
    y = torch.empty((n, w.m), dtype=torch.float32)
    if n and w.m:
        ldx = x.stride(0) if n > 1 else w.k
        rc = library.load().quant_gemm_f32(
            ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w.data.data_ptr()),
            ctypes.c_void_p(y.data_ptr()), n, w.k, w.m, ldx, w.kind, max(1, int(threads)))
        if rc == OUT_OF_MEMORY:
            raise MemoryError(f"quant_gemm_f32: no memory for the panels of a {n}-row block")
        if rc != 0:
            raise ValueError(f"quant_gemm_f32 refused kind={w.kind} k={w.k}")
    return y


def set_long_rows(n: int | None) -> int:
    """Blocks of at least ``n`` rows take the kernel's panel path (weights dequantised once
    per panel for many rows: prefills), shorter ones stream the packed rows (decoding);
    ``None`` restores the default. Returns the previous threshold. The two paths give the same
    bits, so this only moves speed; benchmarks and tests use it to compare them. Process-wide.
    """
    from pipespec_fast.cpu import library

    lib = library.load()
    if lib is None:
        return 0
    return int(lib.quant_gemm_set_long_rows(0 if n is None else max(1, int(n))))
