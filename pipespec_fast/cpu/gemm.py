"""Batch-invariant skinny fp32 GEMM on CPU: ``y = x @ w.T`` for a few rows of ``x``.

Speculative verification runs the target on ``n`` (2..16) tokens at once; OpenBLAS' sgemm packs
the weights and takes ~3x the time of a 1-row GEMV, although the work is bandwidth-bound. The C
kernel in ``csrc/skinny_gemm.c`` streams every weight row from memory once per call, for all
rows of ``x`` (AVX2 + FMA; an AVX-512 path for n >= 3 where the CPU has it; the threads of one
process-wide pool, ``csrc/thread_pool.c``, split the output columns). Any ``n`` is correct; past
~16 it is still faster than OpenBLAS here.

It is also *batch invariant*: ``y[i, o]`` is computed by the same sequence of float operations
whatever ``n``, ``i``, the thread count, the work split or the ISA path (the order depends on
``k`` only), so row ``i`` of a batched call equals, bit for bit, the 1-row call on ``x[i]``.
Greedy speculative decoding then reproduces the target's own greedy tokens even on near-ties.

The kernel lives in the package's one C library (:mod:`pipespec_fast.cpu.library` builds and
loads it). Where the library is unavailable, :func:`skinny_linear` falls back to numpy.
``PIPESPEC_SKINNY_ISA=avx2`` forces the AVX2 path (``RuntimeConfig.skinny_isa``).
"""

from __future__ import annotations

import numpy as np
import torch

from pipespec_fast.cpu import library


def available() -> bool:
    """Whether the C kernel is usable here (builds the library on first call)."""
    return library.load() is not None


def isa() -> str | None:
    """The kernel path in use: ``"avx512"`` (n >= 3; AVX2 below) or ``"avx2"``; ``None`` if
    unavailable. Both give bit-identical results; ``PIPESPEC_SKINNY_ISA`` forces one."""
    lib = library.load()
    return None if lib is None else library.ISA_NAMES.get(lib.skinny_gemm_get_isa())


def set_isa(name: str) -> str | None:
    """Select the kernel path (``"auto"``, ``"avx2"`` or ``"avx512"``; the best available if the
    CPU lacks the one asked for); returns the path now in use. For tests and benchmarks."""
    lib = library.load()
    if lib is None:
        return None
    return library.ISA_NAMES.get(lib.skinny_gemm_set_isa(library.ISA_CODES[name]))


def _numpy_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xn, wn = x.numpy(), w.numpy()
    if xn.shape[0] == 1:
        return torch.from_numpy(np.matmul(wn, xn[0])).unsqueeze(0)
    return torch.from_numpy(np.matmul(xn, wn.T))


def skinny_linear(x: torch.Tensor, w: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``x: [n, k]``, ``w: [m, k]`` (fp32, CPU) -> ``x @ w.T`` as a new ``[n, m]`` tensor.

    Batch invariant (see the module docstring) and reads ``w`` once for all ``n`` rows; tuned for
    ``n <= 16`` but correct for any ``n``. ``threads`` pool threads split the output columns
    (the result does not depend on it). Falls back to numpy when :func:`available` is ``False``.
    """
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_linear: shapes {tuple(x.shape)} @ {tuple(w.shape)}.T")
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        raise TypeError("skinny_linear: float32 only")
    if not (x.is_cpu and w.is_cpu):
        raise ValueError("skinny_linear: CPU tensors only")
    lib = library.load()
    if lib is None:
        return _numpy_linear(x.detach().contiguous(), w.detach().contiguous())
    if not w.is_contiguous():
        w = w.contiguous()
    n, k = x.shape
    if k and (x.stride(1) != 1 or (n > 1 and x.stride(0) < k)):
        x = x.contiguous()
    m = w.shape[0]
    y = torch.empty((n, m), dtype=torch.float32)
    if n and m:
        ldx = x.stride(0) if n > 1 else k
        lib.skinny_gemm_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), n, k, m, ldx, threads)
    return y
