"""``y = x @ w.T`` for the model's projections, fastest per device.

On CPU, fp32 decoding is a stream of small-batch GEMVs, where torch's BLAS path reaches about
20 GB/s on this project's machines and numpy's OpenBLAS about 50 GB/s (``bench/`` measures it).
So CPU fp32 matmuls go through numpy (which releases the GIL, so stage threads overlap); every
other device or dtype uses ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

_USE_NUMPY = os.environ.get("PIPESPEC_CPU_LINEAR", "numpy") == "numpy"


def blas_threads(n: int | None):
    """Context manager: numpy's BLAS uses ``n`` threads inside (``None``: unchanged).

    OpenBLAS' worker threads spin while they wait; when more runnable threads than cores
    compete (several stage threads each driving a multi-threaded GEMV, or another busy process)
    a GEMV slows down several times. One BLAS thread per stage thread avoids that; a single
    stage on an idle machine is fastest with one BLAS thread per core.
    """
    from contextlib import nullcontext

    if n is None or not _USE_NUMPY:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def uses_numpy() -> bool:
    """Whether CPU fp32 matmuls go through numpy (``PIPESPEC_CPU_LINEAR=numpy``, the default)."""
    return _USE_NUMPY


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x: [n, in]``, ``w: [out, in]`` (no grad) -> ``[n, out]`` in ``x.dtype``."""
    if _USE_NUMPY and x.dtype == torch.float32 and w.dtype == torch.float32 and \
            not x.is_cuda and not w.requires_grad and x.device.type == "cpu":
        wn = w.numpy()
        xn = x.detach().numpy()
        if xn.shape[0] == 1:  # GEMV: OpenBLAS' sgemv on the row-major weight
            return torch.from_numpy(np.matmul(wn, xn[0])).unsqueeze(0)
        return torch.from_numpy(np.matmul(xn, wn.T))
    return F.linear(x, w)


class Linear(torch.nn.Module):
    """A bias-free linear layer that calls :func:`linear` (weights ``[out, in]``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features),
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
