"""Tree/chain verification attention with fused KV append (Triton).

Contract: :func:`pipespec_fast.reference.verify_attention` (shapes, dtypes, in-place append).

Grid: ``(cdiv(n * group, BLOCK_R), kv_heads, splits)`` -- one program per (row block, kv head,
range of the cached prefix). With ``splits > 1`` (flash-decoding: :func:`kv_splits`, when the
unsplit grid is smaller than the GPU) each program writes partial ``(max, sum, accumulator)``
rows and :func:`_combine_kernel` merges them in split order. A program owns the query heads of
one GQA group: its ``BLOCK_R`` rows are the flattened ``(node, g)`` pairs ``row = node * group
+ g`` (query head ``kv_head * group + g``), so every K/V tile is loaded once per group instead
of once per query head, and any ratio ``group = n_heads // kv_heads`` works (it is a
``constexpr``; rows need not be a power of two per node).

Per program:

* Fused append: the programs with ``pid_r == 0`` (of split 0) copy ``k_new[:, kv_head]`` /
  ``v_new[:, kv_head]`` into cache slots ``[cache_len, cache_len + n)``. Attention itself reads
  the prefix ``[0, cache_len)`` from the cache and the new tokens straight from ``k_new`` /
  ``v_new``, so the slots being written are never read in the same launch: no race, no second
  kernel, no barrier.
* Prefix (its split's range of it): online softmax (base-2, fp32 running max / sum /
  accumulator) over ``BLOCK_N`` key blocks. Full blocks carry no mask at all; only the last
  partial block masks the columns ``>= cache_len``.
* New tokens (by the last used split): the same online softmax over ``k_new`` in ``BLOCK_N``
  blocks with the tree mask taken bit by bit from ``anc_bits`` (word ``j // 32``, bit ``j % 32``
  of row ``node``): the ``[BLOCK_R, BLOCK_N]`` bits are gathered from the tiny ``[n,
  ceil(n/32)]`` int32 table, never a dense ``n x L`` mask in memory. Only blocks up to the
  program's last node are visited (a node only sees itself and its ancestors, which have
  smaller indices).

Exact mode (``ALIGNED``, :func:`_aligned_range`) replaces the last two passes by one walk over
every key of the program's range by absolute slot (prefix lanes from the cache, the block's
lanes from ``k_new``/``v_new``), with split ranges at fixed slots, so a chain row gets the
same bits whatever block it is verified in (docs/KERNELS.md, "GPU numerics").

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

from pipespec_fast import reference

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


@triton.jit
def _prefix_range(acc, m_i, l_i, q, kc_base, vc_base, lo, hi, s_kct, s_kcd, s_vct, s_vcd,
                  qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Cached keys ``[lo, hi)``: full ``BLOCK_N`` blocks without any mask, then one partial
    block masked at ``hi`` (``lo`` is a multiple of ``BLOCK_N``)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_j = tl.arange(0, BLOCK_N)
    n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start in range(lo, n_full, BLOCK_N):
        t = (start + offs_j).to(tl.int64)
        if HEAD_DIM == BLOCK_D:
            k = tl.load(kc_base + t[:, None] * s_kct + offs_d[None, :] * s_kcd)
            v = tl.load(vc_base + t[:, None] * s_vct + offs_d[None, :] * s_vcd)
        else:
            k = tl.load(kc_base + t[:, None] * s_kct + offs_d[None, :] * s_kcd,
                        mask=d_ok[None, :], other=0.0)
            v = tl.load(vc_base + t[:, None] * s_vct + offs_d[None, :] * s_vcd,
                        mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, None, qk_scale, DOT_PREC)
    if n_full < hi:
        t = n_full + offs_j
        t_ok = t < hi
        tm = t_ok[:, None] & d_ok[None, :]
        t64 = t.to(tl.int64)
        k = tl.load(kc_base + t64[:, None] * s_kct + offs_d[None, :] * s_kcd, mask=tm, other=0.0)
        v = tl.load(vc_base + t64[:, None] * s_vct + offs_d[None, :] * s_vcd, mask=tm, other=0.0)
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, t_ok[None, :], qk_scale, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _split_layout(cache_len, n, num_splits, min_split, BLOCK_N: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """``(split_len, used)``: the prefix is cut into ``used`` ranges of ``split_len`` keys (a
    multiple of ``BLOCK_N``, at least ``min_split``), the last one shorter. A pure function of
    ``cache_len`` and the launch's fixed ``num_splits`` / ``min_split``: the split kernel and
    the combine compute the same layout, and no row's layout depends on ``n``.

    ``ALIGNED``: the ranges cut every key of the block, prefix and new tokens alike, at the
    fixed multiples of ``min_split`` (the host's :func:`aligned_split_len`), so a key's range
    depends only on its slot."""
    if ALIGNED:
        split_len = min_split
        used = tl.maximum(tl.cdiv(cache_len + n, split_len), 1)
    else:
        per = tl.maximum(tl.cdiv(cache_len, num_splits), min_split)
        split_len = tl.cdiv(per, BLOCK_N) * BLOCK_N
        used = tl.maximum(tl.cdiv(cache_len, split_len), 1)
    return split_len, used


@triton.jit
def _aligned_range(acc, m_i, l_i, q, node, row_ok, kc_base, vc_base, kn_base, vn_base,
                   anc_ptr, cache_len, n, lo, hi, s_kct, s_kcd, s_vct, s_vcd, s_knn, s_knd,
                   s_vnn, s_vnd, s_an, s_aw, qk_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys ``[lo, hi)`` by absolute slot (exact mode): tiles start at multiples of
    ``BLOCK_N`` of the slot, a lane below ``cache_len`` reads the cache and one above reads
    ``k_new``/``v_new``, and every tile is masked (prefix: visible; new: ancestor bits). A row
    then meets each of its keys in the same lane of the same tile whether it is decoded alone
    or verified anywhere in a chain, and a tile past its last key changes nothing (its
    weights are exact zeros, its rescale factor exactly 1), so its bits cannot depend on the
    block. (A tree's row meets masked siblings between its ancestors: not invariant.)"""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_j = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_j
        in_c = t < cache_len
        in_n = (t >= cache_len) & (t < cache_len + n)
        j = tl.where(in_n, t - cache_len, 0)  # the new token's index (0 where not one)
        # one load per tile: each lane's pointer into the cache or into k_new / v_new (one
        # dtype: ops validates it), masked where the lane holds no key
        tc = tl.where(in_c, t, 0).to(tl.int64)[:, None]
        lane = ((in_c | in_n)[:, None]) & d_ok[None, :]
        k = tl.load(tl.where(in_c[:, None], kc_base + tc * s_kct + offs_d[None, :] * s_kcd,
                             kn_base + j[:, None] * s_knn + offs_d[None, :] * s_knd),
                    mask=lane, other=0.0)
        v = tl.load(tl.where(in_c[:, None], vc_base + tc * s_vct + offs_d[None, :] * s_vcd,
                             vn_base + j[:, None] * s_vnn + offs_d[None, :] * s_vnd),
                    mask=lane, other=0.0)
        words = tl.load(anc_ptr + node[:, None] * s_an + (j // 32)[None, :] * s_aw,
                        mask=row_ok[:, None] & in_n[None, :], other=0)
        bit = (words >> (j % 32)[None, :]) & 1
        seen = in_c[None, :] | (in_n[None, :] & (bit != 0))
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, seen, qk_scale, DOT_PREC)
    return acc, m_i, l_i


# 46 of its lines are the signature: a base pointer and its strides per tensor, so any layout
# runs without a copy, and the partial-result buffer of the split path. The body is three
# marked passes (KV append, this program's range of the cached prefix, new tokens) over one
# query tile and one online-softmax state held in registers, then one store (final rows, or
# the split's partial max / sum / accumulator).
# long: one Triton program (one launch); signature of strides plus three passes over one state
@triton.jit(do_not_specialize=["n", "cache_len", "s_an", "s_os", "s_ms", "s_mw"])
def _verify_attention_kernel(
    q_ptr,
    kn_ptr,
    vn_ptr,
    kc_ptr,
    vc_ptr,
    anc_ptr,
    out_ptr,
    ml_ptr,
    n,
    cache_len,
    num_splits,
    min_split,
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
    s_os,
    s_on,
    s_oh,
    s_od,
    s_ms,
    s_mw,
    s_mn,
    s_mh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    LEN_PTR: tl.constexpr,
    SPLIT: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if LEN_PTR:  # a 0-d int32 device tensor: read here, so the launch never depends on it
        cache_len = tl.load(cache_len).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_j = tl.arange(0, BLOCK_N)

    kn_base = kn_ptr + kvh * s_knh
    vn_base = vn_ptr + kvh * s_vnh
    kc_base = kc_ptr + kvh.to(tl.int64) * s_kch
    vc_base = vc_ptr + kvh.to(tl.int64) * s_vch

    # ---- fused KV append (one program per kv head); these slots are not read below.
    if (pid_r == 0) & (split == 0):
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

    split_len, used = _split_layout(cache_len, n, num_splits, min_split, BLOCK_N, ALIGNED)
    if split < used:
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

        lo = split * split_len
        last_node = tl.minimum((pid_r * BLOCK_R + BLOCK_R - 1) // GROUP, n - 1)
        if ALIGNED:  # ---- exact mode: this split's range of every key, by absolute slot
            hi = tl.minimum(lo + split_len, cache_len + last_node + 1)
            acc, m_i, l_i = _aligned_range(acc, m_i, l_i, q, node, row_ok, kc_base, vc_base,
                                           kn_base, vn_base, anc_ptr, cache_len, n, lo, hi,
                                           s_kct, s_kcd, s_vct, s_vcd, s_knn, s_knd, s_vnn,
                                           s_vnd, s_an, s_aw, qk_scale, HEAD_DIM, BLOCK_D,
                                           BLOCK_N, DOT_PREC)
        else:  # ---- this split's range of the prefix (all of it when there is one split)
            hi = tl.minimum(lo + split_len, cache_len)
            acc, m_i, l_i = _prefix_range(acc, m_i, l_i, q, kc_base, vc_base, lo, hi, s_kct,
                                          s_kcd, s_vct, s_vcd, qk_scale, HEAD_DIM, BLOCK_D,
                                          BLOCK_N, DOT_PREC)

        # ---- new tokens (by the last used split, whose prefix range is the shortest),
        # masked by the ancestor bits; node i only sees j <= i.
        if not ALIGNED:  # (exact mode took the new tokens above)
            if split == used - 1:
                for start in range(0, last_node + 1, BLOCK_N):
                    j = start + offs_j
                    j_ok = j < n
                    jm = j_ok[:, None] & d_ok[None, :]
                    k = tl.load(kn_base + j[:, None] * s_knn + offs_d[None, :] * s_knd, mask=jm,
                                other=0.0)
                    v = tl.load(vn_base + j[:, None] * s_vnn + offs_d[None, :] * s_vnd, mask=jm,
                                other=0.0)
                    words = tl.load(
                        anc_ptr + node[:, None] * s_an + (j // 32)[None, :] * s_aw,
                        mask=row_ok[:, None] & j_ok[None, :],
                        other=0,
                    )
                    bit = (words >> (j % 32)[None, :]) & 1
                    acc, m_i, l_i = _online_block(acc, m_i, l_i, q, k, v, bit != 0, qk_scale,
                                                  DOT_PREC)

        o_ptrs = (out_ptr + split * s_os + node[:, None] * s_on + head[:, None] * s_oh
                  + offs_d[None, :] * s_od)
        o_mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT:  # the partial state; _combine_kernel merges the splits in order
            tl.store(o_ptrs, acc, mask=o_mask)
            ml = ml_ptr + split * s_ms + node * s_mn + head * s_mh
            tl.store(ml, m_i, mask=row_ok)
            tl.store(ml + s_mw, l_i, mask=row_ok)
        else:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)


# long: one Triton program; a signature of strides and one ordered merge loop
@triton.jit(do_not_specialize=["n", "cache_len", "s_ps", "s_ms", "s_mw"])
def _combine_kernel(
    part_ptr,
    ml_ptr,
    out_ptr,
    n,
    cache_len,
    num_splits,
    min_split,
    s_ps,
    s_pn,
    s_ph,
    s_pd,
    s_ms,
    s_mw,
    s_mn,
    s_mh,
    s_on,
    s_oh,
    s_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LEN_PTR: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    """Merge the used splits' ``(m, l, acc)`` rows in split order: a fixed order, so a row's
    result is deterministic and independent of ``n`` and of the other rows. (A split that
    saw none of a row's keys holds ``m = -1e30, l = 0, acc = 0``: merging it scales by
    exactly 1 and adds exact zeros.)"""
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    if LEN_PTR:
        cache_len = tl.load(cache_len).to(tl.int32)
    _, used = _split_layout(cache_len, n, num_splits, min_split, BLOCK_N, ALIGNED)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    node = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = node < n
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, used):
        ml = ml_ptr + s * s_ms + node * s_mn + head * s_mh
        m_s = tl.load(ml, mask=row_ok, other=-1.0e30)
        l_s = tl.load(ml + s_mw, mask=row_ok, other=0.0)
        a_s = tl.load(part_ptr + s * s_ps + node[:, None] * s_pn + head[:, None] * s_ph
                      + offs_d[None, :] * s_pd, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    l_safe = tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptr + node[:, None] * s_on + head[:, None] * s_oh + offs_d[None, :] * s_od,
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


# Warps of the attention program: with 4, a 64-row tile needs up to 218 registers on sm_90
# and spills on sm_80 in bf16/fp16; with 8, 143-188 on sm_90 and no bf16/fp16 variant spills
# on either (bench/aot_matrix.py, docs/KERNELS.md).
ATTENTION_WARPS = 8
# Rows per combine program: its [rows, head_dim] fp32 accumulator and partial tile stay in
# registers (32 rows spill on sm_90 at head_dim 64). A row's merge is elementwise over the
# splits, so the tile does not change its bits.
COMBINE_ROWS = 16
# The shortest range of cached keys a split takes: below it a split's fixed cost (loading
# the queries, writing and merging a partial row) outweighs the keys it reads.
MIN_SPLIT_KEYS = 256


def verify_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float | None = None,
    *,
    block_r: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    min_split: int = MIN_SPLIT_KEYS,
    aligned: bool = False,
) -> torch.Tensor:
    """Triton twin of :func:`pipespec_fast.reference.verify_attention` (two launches if split).

    ``cache_len`` is a host int or a 0-d int32 tensor on ``q``'s device, read by the kernels
    (what CUDA-graph capture needs: the launch then does not depend on its value). Neither
    form makes Triton compile a variant per value (``do_not_specialize``).
    ``q`` may have any strides; ``k_new``/``v_new``/``k_cache``/``v_cache``/``anc_bits`` too
    (strides are passed). ``block_r``/``block_n`` override the tile sizes (powers of two,
    ``>= 16``), for tests. ``num_splits`` overrides :func:`kv_splits` (the interpreter has no
    SM count: tests pass it), ``min_split`` the shortest split. Arguments are validated by
    :func:`pipespec_fast.ops.verify_attention`. No host synchronisation: every size is a host
    int taken from shapes. ``aligned``: exact mode's layout (:func:`_aligned_range`).
    """
    n, n_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = n_heads // kv_heads
    out = torch.empty((n, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    if scale is None:
        scale = head_dim**-0.5
    len_ptr = isinstance(cache_len, torch.Tensor)
    cl = cache_len if len_ptr else int(cache_len)
    block_r, block_d, block_n = _tile_sizes(n * group, head_dim, block_r, block_n)
    num_splits, min_split = _split_plan(n, kv_heads, k_cache.shape[1], q.device, cl,
                                        num_splits, min_split, block_n, aligned)
    split = num_splits > 1
    row_blocks = triton.cdiv(n * group, block_r)
    part, ml, part_strides, ml_strides = _partials(out, num_splits)
    tiles = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r,
                 BLOCK_N=block_n, LEN_PTR=len_ptr, ALIGNED=aligned)
    _verify_attention_kernel[(row_blocks, kv_heads, num_splits)](
        q, k_new, v_new, k_cache, v_cache, anc_bits, part, ml,
        n, cl, num_splits, min_split, float(scale) * _LOG2E,
        *q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        *anc_bits.stride(), *part_strides, *ml_strides,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SPLIT=split,
        num_warps=ATTENTION_WARPS, **tiles,
    )
    if split:
        _combine_kernel[(triton.cdiv(n * group, COMBINE_ROWS), kv_heads)](
            part, ml, out, n, cl, num_splits, min_split, *part.stride(), *ml.stride(),
            *out.stride(), num_warps=4, **dict(tiles, BLOCK_R=COMBINE_ROWS),
        )
    return out


def _split_plan(n: int, kv_heads: int, max_len: int, device: torch.device,
                cache_len: int | torch.Tensor, num_splits: int | None, min_split: int,
                block_n: int, aligned: bool) -> tuple[int, int]:
    """``(num_splits, min_split)`` for a launch: ``num_splits`` as given, else
    :func:`_auto_splits`; aligned, the count from shapes alone (whatever ``n`` and the cache
    length) and, in ``min_split``'s place, the ranges' fixed length."""
    if aligned:
        if num_splits is None:
            num_splits = kv_splits(1, kv_heads, max_len, _sm_count(device), min_split)
        return num_splits, aligned_split_len(max_len, num_splits, block_n, min_split)
    if num_splits is None:
        num_splits = _auto_splits(n, kv_heads, max_len, device, cache_len, min_split)
    return num_splits, min_split


def aligned_split_len(max_len: int, num_splits: int, block_n: int, min_split: int) -> int:
    """The keys of one split in aligned mode: ``max_len`` cut into ``num_splits`` ranges (at
    least ``min_split`` keys, a multiple of ``block_n``), fixed by shapes, so a key's split
    depends on its slot alone. Short contexts use the first splits only (the price of
    exactness: less parallelism than the default layout, which cuts the used prefix)."""
    per = max(triton.cdiv(max_len, num_splits), min_split)
    return triton.cdiv(per, block_n) * block_n


def _auto_splits(n: int, kv_heads: int, max_len: int, device: torch.device,
                 cache_len: int | torch.Tensor, min_split: int) -> int:
    """:func:`kv_splits` on ``device``, except that a host-int ``cache_len <= min_split`` gets
    one: only one range would be used, and the unsplit kernel gives the same bits (merging one
    split is exact) without the partial rows and the second launch. A tensor ``cache_len``
    keeps the count from shapes (a captured grid must not depend on it)."""
    splits = kv_splits(n, kv_heads, max_len, _sm_count(device), min_split)
    if not isinstance(cache_len, torch.Tensor) and cache_len <= min_split:
        return 1
    return splits


def _partials(out: torch.Tensor, num_splits: int):
    """``(part, ml, part strides, ml strides)`` for the attention kernel's output arguments.
    Split: fp32 partial rows, the unnormalised accumulators ``[splits, n, n_heads, head_dim]``
    and ``(max, sum)`` ``[splits, 2, n, n_heads]``. Unsplit: ``out`` itself, split stride 0
    (``ml`` is not touched: ``SPLIT`` is off)."""
    if num_splits == 1:
        return out, out, (0, *out.stride()), (0, 0, 0, 0)
    n, n_heads, head_dim = out.shape
    part = torch.empty((num_splits, n, n_heads, head_dim), dtype=torch.float32,
                       device=out.device)
    ml = torch.empty((num_splits, 2, n, n_heads), dtype=torch.float32, device=out.device)
    return part, ml, part.stride(), ml.stride()


def kv_splits(n: int, kv_heads: int, max_len: int, sm_count: int | None,
              min_split: int = MIN_SPLIT_KEYS) -> int:
    """How many ranges the cached prefix is split into (flash-decoding), from shapes only.

    A verify block (``n <= MAX_TREE_NODES``) fits one row block per kv head at decode sizes,
    so its unsplit grid is ``kv_heads`` programs (8 for Llama-3-8B on 132 SMs): each walks the
    whole prefix alone and the GPU idles. Rule: when ``kv_heads < sm_count``, split into
    ``ceil(sm_count / kv_heads)`` ranges (about one wave of programs at the smallest block),
    no more than ``max_len / min_split`` (a split reads at least ``min_split`` keys); else
    one. The count depends on neither ``n`` (within a verify block) nor ``cache_len``: a row's
    result is then the same bits whatever the block size (batch invariance), whether
    ``cache_len`` is an int or a tensor, and a captured graph's grid stays fixed. A prefill
    block (``n > MAX_TREE_NODES``) already has ``cdiv(n * group, 64) * kv_heads`` programs
    and is not split (its partial rows would cost ``splits * n * n_heads * head_dim`` floats).
    ``sm_count`` ``None`` (no GPU: the interpreter) means one split.
    """
    if sm_count is None or n > reference.MAX_TREE_NODES or kv_heads >= sm_count:
        return 1
    return max(1, min(triton.cdiv(sm_count, kv_heads), max_len // max(min_split, 1)))


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached: a host query, no sync); ``None``
    on the CPU."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def _tile_sizes(rows: int, head_dim: int, block_r: int | None, block_n: int | None,
                ) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, BLOCK_N)``: query rows per program, the head dim padded to a power
    of two, and keys per step (32 for head dims over 64, which keeps the ``[BLOCK_R, BLOCK_D]``
    accumulator and the K/V tiles in registers).

    ``BLOCK_R`` is 64 whatever the block size: a row ``(node, g)`` then sits at the same place
    of the same compiled program for every ``n``, so its bits cannot depend on ``n`` (batch
    invariance on the GPU too, where a smaller tile could change the layout and with it the
    order of the row reductions), and ``n`` selects no variant. At decode sizes the unused
    rows cost tensor-core work only; the kernel is bound by the K/V it reads."""
    if block_r is None:
        block_r = 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 64 if block_d <= 64 else 32
    return block_r, block_d, block_n
