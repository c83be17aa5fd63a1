"""``y = x @ w.T`` for the model's projections, fastest per device.

On CPU, fp32 decoding is memory-bound small-batch matmuls. torch's BLAS path reaches about
20 GB/s on this project's machines; ``gemm.py``'s skinny kernel streams every weight once for
all rows of a block (about 40 GB/s), batch-invariantly, and releases the GIL so stage threads
overlap. Fallback: numpy's OpenBLAS. Every other device or dtype uses ``F.linear``.

The route is read from the process configuration when a matmul runs
(``PIPESPEC_CPU_LINEAR=skinny|numpy|torch``, ``RuntimeConfig.cpu_linear``): importing reads
nothing and builds nothing.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from pipespec_fast import config


def _cpu_linear() -> str:
    """How CPU fp32 matmuls run: our skinny GEMM ("skinny", numpy's BLAS where the C library is
    unavailable), numpy's BLAS ("numpy"), or torch's F.linear ("torch"). Read from the process
    configuration when needed, not at import: importing the engine never fails on a setting."""
    return config.current().cpu_linear


def blas_threads(n: int | None):
    """Context manager: numpy's BLAS uses ``n`` threads inside (``None``: unchanged).

    OpenBLAS' worker threads spin while they wait; when more runnable threads than cores
    compete (several stage threads each driving a multi-threaded GEMV, or another busy process)
    a GEMV slows down several times. One BLAS thread per stage thread avoids that; a single
    stage on an idle machine is fastest with one BLAS thread per core.
    """
    from contextlib import nullcontext

    if n is None or not own_cpu_matmuls():
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def own_cpu_matmuls() -> bool:
    """Whether CPU fp32 matmuls bypass torch (our C kernel or numpy's BLAS, sized by the thread
    policy): ``PIPESPEC_CPU_LINEAR=skinny`` (default) or ``numpy``; ``torch`` keeps
    ``F.linear``."""
    return _cpu_linear() != "torch"


_threads = 1
_local = threading.local()


def set_threads(n: int) -> int:
    """Threads each CPU matmul may use (set per generation by the pipeline's thread policy);
    returns the previous value."""
    global _threads
    old, _threads = _threads, max(1, int(n))
    return old


def set_threads_for_this_thread(n: int | None) -> None:
    """Override :func:`set_threads` for matmuls called from the current thread (a stage
    worker); ``None`` removes the override."""
    _local.n = None if n is None else max(1, int(n))


def current_threads() -> int:
    """Threads a matmul called from this thread uses."""
    return getattr(_local, "n", None) or _threads


def _skinny_gemm():
    """The skinny GEMM module when it serves the matmuls, else ``None`` (numpy or torch).
    Looked up per call (the library's own load is cached), so nothing is built at import."""
    if _cpu_linear() != "skinny":
        return None
    from pipespec_fast.cpu import gemm

    return gemm if gemm.available() else None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x: [n, in]``, ``w: [out, in]`` (no grad) -> ``[n, out]`` in ``x.dtype``.

    On CPU in fp32 every block goes to the batch-invariant skinny GEMM (``gemm.py``, a small
    AVX2/AVX-512 C kernel built on first use): it reads each weight once for all rows, so
    verifying 8 tokens costs about what decoding one does, and row ``i`` of the result is
    bit-identical whatever the number of rows — the projections of a verified token equal
    those of one-token decoding. Without a compiler or AVX2 it falls back to numpy's OpenBLAS.
    """
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and \
            not w.requires_grad and torch.compiler.is_compiling():
        # traced by torch.compile (a captured step's CPU test): the route below as one opaque
        # op, pipespec_fast.custom_ops, since a ctypes call cannot be traced
        return torch.ops.pipespec.linear(x, w)
    if x.dtype == torch.float32 and w.dtype == torch.float32 and not x.is_cuda and \
            not w.requires_grad and x.device.type == "cpu" and own_cpu_matmuls():
        gemm = _skinny_gemm()
        if gemm is not None:
            return gemm.skinny_linear(x, w, current_threads())
        wn = w.numpy()
        xn = x.detach().numpy()
        if xn.shape[0] == 1:  # GEMV: OpenBLAS' sgemv on the row-major weight
            return torch.from_numpy(np.matmul(wn, xn[0])).unsqueeze(0)
        return torch.from_numpy(np.matmul(xn, wn.T))
    return F.linear(x, w)


class Linear(torch.nn.Module):
    """A bias-free linear layer that calls :func:`linear` (weights ``[out, in]``).

    ``packed`` (optional, a :class:`~pipespec_fast.cpu.quant.PackedWeight` holding the same values
    in their storage format) is used instead for fp32 inputs on CPU while the weight itself is
    fp32 on CPU: fewer bytes per token, the same weights. A model may hold a matrix only in
    packed form (``weight`` is then a placeholder on the meta device:
    ``pipespec_fast.models.packed``); other inputs are then refused, and ``state_dict()``
    dequantises the packed rows. ``compute`` (``validate.COMPUTE_MODES``, set per model by
    ``models.packed.set_compute``): ``"int8"`` runs Q4_1 / Q8_0 packed copies through the int8
    GEMM (``pipespec_fast.cpu.int8.int8_linear``), as does ``packed_int8`` (an fp16 matrix's
    Q8_0 copy, made by ``set_compute``) in place of ``packed``; other formats stay exact.
    """

    compute = "exact"
    packed_int8 = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features),
                                         requires_grad=False)
        self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, w = self.packed, self.weight
        if p is not None and x.dtype == torch.float32 and x.device.type == "cpu" and \
                w.dtype == torch.float32 and w.device.type in ("cpu", "meta"):
            if self.compute == "int8":
                from pipespec_fast.cpu.int8 import int8_linear

                return int8_linear(x, self.packed_int8 or p, current_threads())
            from pipespec_fast.cpu.quant import packed_linear

            return packed_linear(x, p, current_threads())
        if w.is_meta and p is None:
            raise RuntimeError(f"Linear {tuple(w.shape)}: no weights loaded (meta device)")
        if w.is_meta:
            raise RuntimeError(
                f"Linear {tuple(w.shape)}: this matrix is held only in packed form (its fp32 "
                f"copy was dropped at load), which serves fp32 CPU inputs; got {x.dtype} on "
                f"{x.device}. Load the model with packed=False, or call its "
                "materialize_fp32() first.")
        return linear(x, w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta and self.packed is not None:
            destination[prefix + "weight"] = self.packed.dequantize()


