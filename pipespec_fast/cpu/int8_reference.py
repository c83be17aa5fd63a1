"""Torch statement of the int8 GEMM's arithmetic (``csrc/int8_gemm.c``): the tests' oracles.

Three pieces, each a contract the kernel is held to:

* :func:`quantize_rows` quantises activations with the same fp32 operations as the kernel
  (``d = fl(amax / 127)``, ``q = clamp(rne(fl(x * fl(1 / d))), -127, 127)``, ``ds = fl(d *
  sum)``), so its output equals the kernel's bit for bit;
* :func:`oracle` computes the product of those blocks in float64: exact integer block dots
  ``I_b``, the kernel's fp32 scale products ``fl(dw_b * d_b)``, then the sum over blocks
  without rounding. The kernel rounds once per fma of its block-ordered chain, so
  ``|kernel - oracle| <= gamma(N) * sum_b |term_b|`` with ``N`` the number of fmas and
  ``gamma(N) = N u / (1 - N u)``, ``u = 2^-24`` (recursive summation of exact terms; see
  :func:`error_bound`);
* :func:`fp32_product` is what the int8 arithmetic approximates: ``x @ dequant(W).T`` in float64
  on the packed weights' fp32 values, for the activation-quantisation error.
"""

from __future__ import annotations

import torch

from pipespec_fast.cpu.quant import Q4_1, Q8_0, PackedWeight

QK = 32
U32 = 2.0 ** -24  # fp32 unit roundoff


def quantize_rows(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x: [n, k]`` fp32 -> ``q`` int8 ``[n, k]`` and ``d``, ``ds`` fp32, ``sum``, ``off`` int32
    ``[n, k / 32]``, exactly as ``int8_quantize_rows`` (including its NaN/inf and tiny-block
    rules)."""
    x = x.float()
    n, k = x.shape
    blk = x.reshape(n, k // QK, QK)
    bad = ~torch.isfinite(blk).all(-1)
    amax = torch.where(bad[..., None], 0.0, blk.abs()).amax(-1)
    d = amax / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    tiny = ~torch.isfinite(inv)  # 1 / d overflowed: the block counts as zero
    d, inv = torch.where(tiny, 0.0, d), torch.where(tiny, 0.0, inv)
    safe = torch.where(bad[..., None], 0.0, blk)
    q = torch.round(safe * inv[..., None]).clamp(-127, 127).to(torch.int32)  # half to even
    s = q.sum(-1, dtype=torch.int32)
    d = torch.where(bad, float("nan"), d)
    return {"q": q.to(torch.int8).reshape(n, k), "d": d, "ds": d * s.float(), "sum": s,
            "off": -128 * s}


def weight_blocks(w: PackedWeight) -> dict[str, torch.Tensor]:
    """The integer values and scales of a Q4_1 / Q8_0 weight: ``q`` int ``[m, k / 32, 32]``
    (Q4_1: 0..15, Q8_0: -128..127), ``d`` and (Q4_1) ``m`` fp32 ``[m, k / 32]``."""
    m, nb = w.m, w.k // QK
    if w.kind == Q4_1:
        blocks = w.data.reshape(m, nb, 20)
        nib = blocks[..., 4:20].to(torch.int32)
        q = torch.cat((nib & 0x0F, nib >> 4), -1)
        mins = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    elif w.kind == Q8_0:
        blocks = w.data.reshape(m, nb, 34)
        q = blocks[..., 2:34].contiguous().view(torch.int8).to(torch.int32)
        mins = None
    else:
        raise ValueError(f"int8 reference: weight kind {w.kind} has no int8 path")
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    return {"q": q, "d": d, "m": mins}


def _terms(xq: dict[str, torch.Tensor], w: PackedWeight) -> list[torch.Tensor]:
    """The float64 terms the kernel's fmas add, each ``[n, m, k / 32]`` (exact values)."""
    wb = weight_blocks(w)
    n, k = xq["q"].shape
    qx = xq["q"].reshape(n, k // QK, QK).double()
    dots = torch.einsum("nbj,mbj->nmb", qx, wb["q"].double())  # exact: integers < 2^53
    scale = wb["d"][None] * xq["d"][:, None]  # fp32 products, as the kernel rounds them
    terms = [dots * scale.double()]
    if wb["m"] is not None:
        terms.append(wb["m"].double()[None] * xq["ds"].double()[:, None])
    return terms


def oracle(xq: dict[str, torch.Tensor], w: PackedWeight) -> torch.Tensor:
    """float64 ``[n, m]``: the sum over blocks of the kernel's exact terms, unrounded."""
    return sum(t.sum(-1) for t in _terms(xq, w))


def error_bound(xq: dict[str, torch.Tensor], w: PackedWeight) -> torch.Tensor:
    """``gamma(N) * sum |terms|`` ``[n, m]``: how far the kernel's fp32 fma chain may be from
    :func:`oracle` (``N`` = one fma per block, two for Q4_1)."""
    terms = _terms(xq, w)
    fmas = len(terms) * (w.k // QK)
    gamma = fmas * U32 / (1 - fmas * U32)
    return gamma * sum(t.abs().sum(-1) for t in terms)


def fp32_product(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """float64 ``x @ dequant(W).T``: the exact-mode product the int8 one approximates."""
    return x.double() @ w.dequantize().double().T


__all__ = ["Q4_1", "Q8_0", "error_bound", "fp32_product", "oracle", "quantize_rows",
           "weight_blocks"]
