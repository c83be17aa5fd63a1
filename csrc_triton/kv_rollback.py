"""KV-cache compaction after acceptance (Triton); rollback itself needs no kernel.

Contract: :func:`pipespec_fast.reference.kv_compact`. Rolling back rejected drafts is a length
pointer move done by the cache's owner; only the accepted path of a *tree* (whose nodes sit at
scattered slots ``cache_len + path[i]``) must be moved down to contiguous slots.

Grid: ``(n_layers * kv_heads, cdiv(head_dim, BLOCK_D))`` -- every layer of both caches in one
launch. Each program owns one ``(layer, kv_head)`` plane and one ``head_dim`` slice and walks
the path entries ``i = 0 .. m-1`` in increasing order: load row ``src[i]``, store it at row
``dst_start + i``, for K and V.

Why this is correct when source and destination overlap (``src`` strictly increasing and
``src[i] >= dst_start + i``, validated by the caller on the host where that is free):

* A store never clobbers a row still to be read: entry ``i`` writes row ``dst_start + i``,
  and every later entry ``k > i`` reads ``src[k] >= dst_start + k > dst_start + i``.
* A load never sees a row written earlier in the same launch: the rows written before entry
  ``k`` are ``dst_start + i`` for ``i < k``, all ``< dst_start + k <= src[k]``.
* A row read at entry ``j`` and overwritten at a later entry ``i > j`` (``src[j] == dst_start +
  i``) is read before it is written: entry ``i``'s store follows entry ``j``'s load in program
  order, and the same thread touches the same ``(row, d)`` element in both, because the
  element-to-thread layout of the ``[BLOCK_D]`` vector is identical in every iteration.
* Different programs touch disjoint ``(layer, head, d)`` slices, so no cross-program hazard.

Entries already in place (``src[i] == dst_start + i``, e.g. the accepted prefix of a chain)
are skipped. ``src`` is read on the device (no host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# m and dst_start change every step: not specialised on (no compile mid-generation)
@triton.jit(do_not_specialize=["m", "dst_start"])
def _kv_compact_kernel(
    k_ptr,
    v_ptr,
    src_ptr,
    m,
    dst_start,
    kv_heads,
    s_kl,
    s_kh,
    s_kt,
    s_kd,
    s_vl,
    s_vh,
    s_vt,
    s_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    layer = (pid // kv_heads).to(tl.int64)
    head = (pid % kv_heads).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = k_ptr + layer * s_kl + head * s_kh + offs_d * s_kd
    v_base = v_ptr + layer * s_vl + head * s_vh + offs_d * s_vd
    for i in range(m):
        src = tl.load(src_ptr + i).to(tl.int64)
        dst = (dst_start + i).to(tl.int64)
        if src != dst:
            kk = tl.load(k_base + src * s_kt, mask=d_ok)
            vv = tl.load(v_base + src * s_vt, mask=d_ok)
            tl.store(k_base + dst * s_kt, kk, mask=d_ok)
            tl.store(v_base + dst * s_vt, vv, mask=d_ok)


def kv_compact(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src: torch.Tensor,
    dst_start: int,
    *,
    block_d: int | None = None,
) -> None:
    """Triton twin of :func:`pipespec_fast.reference.kv_compact`: in place, all layers.

    ``k_cache, v_cache: [n_layers, kv_heads, max_len, head_dim]`` (any strides), ``src: [m]``
    int32/int64 on the cache's device. One launch; returns nothing.
    """
    m = src.shape[0]
    if m == 0:
        return
    n_layers, kv_heads, _, head_dim = k_cache.shape
    if block_d is None:
        block_d = min(128, max(32, triton.next_power_of_2(head_dim)))
    grid = (n_layers * kv_heads, triton.cdiv(head_dim, block_d))
    # num_warps=1: a [BLOCK_D] row is spread over one warp; see the module doc for why the
    # in-order walk is race free.
    _kv_compact_kernel[grid](
        k_cache,
        v_cache,
        src,
        m,
        int(dst_start),
        kv_heads,
        *k_cache.stride(),
        *v_cache.stride(),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        num_warps=1,
    )
