"""Tree/chain verification attention with fused KV append (Triton).

Contract: :func:`pipespec_fast.reference.verify_attention` (shapes, dtypes, in-place append).

Grid: ``(cdiv(n * group, BLOCK_R), kv_heads)`` -- one program per (row block, kv head). A
program owns the query heads of one GQA group: its ``BLOCK_R`` rows are the flattened
``(node, g)`` pairs ``row = node * group + g`` (query head ``kv_head * group + g``), so every
K/V tile is loaded once per group instead of once per query head, and any ratio ``group =
n_heads // kv_heads`` works (it is a ``constexpr``; rows need not be a power of two per node).

Per program:

* Fused append: the programs with ``pid_r == 0`` copy ``k_new[:, kv_head]`` /
  ``v_new[:, kv_head]`` into cache slots ``[cache_len, cache_len + n)``. Attention itself reads
  the prefix ``[0, cache_len)`` from the cache and the new tokens straight from ``k_new`` /
  ``v_new``, so the slots being written are never read in the same launch: no race, no second
  kernel, no barrier.
* Prefix: online softmax (base-2, fp32 running max / sum / accumulator) over ``BLOCK_N`` key
  blocks. Full blocks carry no mask at all; only the last partial block masks the columns
  ``>= cache_len``.
* New tokens: the same online softmax over ``k_new`` in ``BLOCK_N`` blocks with the tree mask
  taken bit by bit from ``anc_bits`` (word ``j // 32``, bit ``j % 32`` of row ``node``): the
  ``[BLOCK_R, BLOCK_N]`` bits are gathered from the tiny ``[n, ceil(n/32)]`` int32 table, never
  a dense ``n x L`` mask in memory. Only blocks up to the program's last node are visited
  (a node only sees itself and its ancestors, which have smaller indices).

The running max starts at a finite ``-1e30`` so a row whose current block is fully masked
contributes ``exp2(-inf) = 0`` instead of ``NaN``; every real row sees at least itself, so its
final sum is positive. fp32 ``tl.dot`` uses ``input_precision="ieee"``; fp16/bf16 inputs use
tensor cores with fp32 accumulation (``p`` is cast to the value dtype for ``p @ v``, as flash
attention does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _online_block(acc, m_i, l_i, q, k, v, qk_mask, qk_scale, DOT_PREC: tl.constexpr):
    """One key block of the online softmax; ``qk_mask`` None means no mask at all."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if qk_mask is not None:
        qk = tl.where(qk_mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


# 38 of its lines are the signature: a base pointer and its strides per tensor, so any layout
# runs without a copy. The body is three marked passes (KV append, cached prefix, new tokens)
# over one query tile and one online-softmax state held in registers; their shared step is
# _online_block. Helpers for the passes would each take that state and a dozen pointers/strides.
# long: one Triton program (one launch); signature of strides plus three passes over one state
@triton.jit
def _verify_attention_kernel(
    q_ptr,
    kn_ptr,
    vn_ptr,
    kc_ptr,
    vc_ptr,
    anc_ptr,
    out_ptr,
    n,
    cache_len,
    qk_scale,
    s_qn,
    s_qh,
    s_qd,
    s_knn,
    s_knh,
    s_knd,
    s_vnn,
    s_vnh,
    s_vnd,
    s_kch,
    s_kct,
    s_kcd,
    s_vch,
    s_vct,
    s_vcd,
    s_an,
    s_aw,
    s_on,
    s_oh,
    s_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_j = tl.arange(0, BLOCK_N)

    kn_base = kn_ptr + kvh * s_knh
    vn_base = vn_ptr + kvh * s_vnh
    kc_base = kc_ptr + kvh.to(tl.int64) * s_kch
    vc_base = vc_ptr + kvh.to(tl.int64) * s_vch

    # ---- fused KV append (one program per kv head); these slots are not read below.
    if pid_r == 0:
        for start in range(0, n, BLOCK_N):
            j = start + offs_j
            jm = (j < n)[:, None] & d_ok[None, :]
            kk = tl.load(kn_base + j[:, None] * s_knn + offs_d[None, :] * s_knd, mask=jm)
            vv = tl.load(vn_base + j[:, None] * s_vnn + offs_d[None, :] * s_vnd, mask=jm)
            slot = (cache_len + j).to(tl.int64)
            tl.store(
                kc_base + slot[:, None] * s_kct + offs_d[None, :] * s_kcd,
                kk.to(kc_ptr.dtype.element_ty),
                mask=jm,
            )
            tl.store(
                vc_base + slot[:, None] * s_vct + offs_d[None, :] * s_vcd,
                vv.to(vc_ptr.dtype.element_ty),
                mask=jm,
            )

    # ---- this program's query rows: (node, g) flattened, query head kvh * GROUP + g.
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    node = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = node < n
    q = tl.load(
        q_ptr + node[:, None] * s_qn + head[:, None] * s_qh + offs_d[None, :] * s_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    # ---- prefix: full blocks without any mask, then one partial block.
    n_full = (cache_len // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        t = (start + offs_j).to(tl.int64)
        if HEAD_DIM == BLOCK_D:
            k = tl.load(kc_base + t[:, None] * s_kct + offs_d[None, :] * s_kcd)
            v = tl.load(vc_base + t[:, None] * s_vct + offs_d[None, :] * s_vcd)
        else:
            k = tl.load(
                kc_base + t[:, None] * s_kct + offs_d[None, :] * s_kcd,
                mask=d_ok[None, :],
                other=0.0,
            )
            v = tl.load(
                vc_base + t[:, None] * s_vct + offs_d[None, :] * s_vcd,
                mask=d_ok[None, :],
                other=0.0,
            )
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, None, qk_scale, DOT_PREC)
    if n_full < cache_len:
        t = n_full + offs_j
        t_ok = t < cache_len
        tm = t_ok[:, None] & d_ok[None, :]
        t64 = t.to(tl.int64)
        k = tl.load(kc_base + t64[:, None] * s_kct + offs_d[None, :] * s_kcd, mask=tm, other=0.0)
        v = tl.load(vc_base + t64[:, None] * s_vct + offs_d[None, :] * s_vcd, mask=tm, other=0.0)
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, t_ok[None, :], qk_scale, DOT_PREC)

    # ---- new tokens, masked by the ancestor bits; node i only sees j <= i.
    last_node = tl.minimum((pid_r * BLOCK_R + BLOCK_R - 1) // GROUP, n - 1)
    for start in range(0, last_node + 1, BLOCK_N):
        j = start + offs_j
        j_ok = j < n
        jm = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kn_base + j[:, None] * s_knn + offs_d[None, :] * s_knd, mask=jm, other=0.0)
        v = tl.load(vn_base + j[:, None] * s_vnn + offs_d[None, :] * s_vnd, mask=jm, other=0.0)
        words = tl.load(
            anc_ptr + node[:, None] * s_an + (j // 32)[None, :] * s_aw,
            mask=row_ok[:, None] & j_ok[None, :],
            other=0,
        )
        bit = (words >> (j % 32)[None, :]) & 1
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, bit != 0, qk_scale, DOT_PREC)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + node[:, None] * s_on + head[:, None] * s_oh + offs_d[None, :] * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def verify_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int,
    anc_bits: torch.Tensor,
    scale: float | None = None,
    *,
    block_r: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`pipespec_fast.reference.verify_attention` (one launch).

    ``q`` may have any strides; ``k_new``/``v_new``/``k_cache``/``v_cache``/``anc_bits`` too
    (strides are passed). ``block_r``/``block_n`` override the tile sizes (powers of two,
    ``>= 16``), for tests. Arguments are validated by :func:`pipespec_fast.ops.verify_attention`.
    No host synchronisation: every size is a host int taken from shapes.
    """
    n, n_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = n_heads // kv_heads
    out = torch.empty((n, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    if scale is None:
        scale = head_dim**-0.5
    block_r, block_d, block_n = _tile_sizes(n * group, head_dim, block_r, block_n)
    grid = (triton.cdiv(n * group, block_r), kv_heads)
    _verify_attention_kernel[grid](
        q, k_new, v_new, k_cache, v_cache, anc_bits, out,
        n, int(cache_len), float(scale) * _LOG2E,
        *q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        *anc_bits.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        # 8 warps for 64-row tiles: with 4, bf16/fp16 spill on sm_80 (255 registers, up to
        # 500 B; bench/aot_matrix.py); with 8, none spill and sm_90 needs 139 instead of 218.
        num_warps=8 if block_r >= 64 else 4,
    )
    return out


def _tile_sizes(rows: int, head_dim: int, block_r: int | None, block_n: int | None,
                ) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, BLOCK_N)``: query rows per program (up to 64, as few as the block
    needs), the head dim padded to a power of two, and keys per step (32 for head dims over 64,
    which keeps the ``[BLOCK_R, BLOCK_D]`` accumulator and the K/V tiles in registers)."""
    if block_r is None:
        block_r = max(16, min(64, triton.next_power_of_2(rows)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 64 if block_d <= 64 else 32
    return block_r, block_d, block_n
