"""Greedy and stochastic (lossless) acceptance of a draft chain or tree (Triton).

Contracts: :func:`pipespec_fast.reference.greedy_accept` and
:func:`pipespec_fast.reference.stochastic_accept`. Both write ``path [n]`` (int64, padded with
-1), ``num_accepted`` and ``next_token`` (0-d int64) into device tensors: the launchers never
read anything back (no ``.item()``/``.tolist()``), so no host synchronisation. Greedy is one
program (grid ``(1,)``). Stochastic is four launches: the vocabulary-wide work that does not
depend on the walk's outcome runs over ``(row, vocabulary chunk)`` / ``(chunk,)`` grids (the
target rows' sums, the extra token's race and the merge of its chunk winners, each merge in a
fixed order), and the walk itself is one program, because which residual it rewrites next
depends on its own accept decisions (a grid-wide barrier inside one launch is not safe in
Triton: programs are not guaranteed to be resident together).

The walk is one increasing sweep ``c = 0 .. n-1``: with topologically ordered parents, the
children of the current node ``cur`` are visited in index order, and every child of an accepted
node has a larger index than it, so "try the children of ``cur`` in order, descend on
acceptance" is exactly "for each ``c`` with ``parents[c] == cur``: test it". Once every child
of ``cur`` failed, no later index has ``cur`` as parent and the sweep is idle.

Random numbers: the host derives the 32-bit keys with :func:`pipespec_fast.reference.rng_key`
(a pure function of python ints: no device work, no sync); the kernel reproduces the
per-index part of :func:`pipespec_fast.reference.counter_uniform` in uint32 arithmetic, so both
backends draw bit-identical uniforms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipespec_fast import reference


@triton.jit
def _fmix32(x):
    # murmur3 finaliser on uint32 (wrapping multiplies).
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x


@triton.jit
def _uniform(key, index):
    """``counter_uniform`` for an int ``index`` (scalar or block) and a uint32 ``key``."""
    x = tl.cast(index, tl.uint32) * 0x9E3779B1
    x = _fmix32(x ^ key)
    x = _fmix32(x ^ 0x5BD1E995)
    return ((x >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit(do_not_specialize=["n"])
def _greedy_kernel(tok_ptr, par_ptr, tgt_ptr, path_ptr, num_ptr, next_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    path = tl.full([BLOCK], -1, dtype=tl.int64)
    cur = tl.full([], -1, dtype=tl.int32)
    count = tl.full([], 0, dtype=tl.int32)
    want = tl.load(tgt_ptr).to(tl.int64)
    for c in range(n):
        par = tl.load(par_ptr + c).to(tl.int32)
        tok = tl.load(tok_ptr + c).to(tl.int64)
        take = (par == cur) & (tok == want)
        path = tl.where(take & (offs == count), c, path)
        count += take.to(tl.int32)
        cur = tl.where(take, c, cur)
        # Row c + 1 exists for every c < n; it only becomes the wanted token on acceptance.
        want = tl.where(take, tl.load(tgt_ptr + c + 1).to(tl.int64), want)
    tl.store(path_ptr + offs, path, mask=offs < n)
    tl.store(num_ptr, count.to(tl.int64))
    tl.store(next_ptr, want)


@triton.jit
def _row_sums_kernel(tp_ptr, sums_ptr, V, s_tp, n_chunks, BLOCK_V: tl.constexpr):
    """Grid ``(n + 1, chunks)``: ``sums[row, c]`` = the sum of target row ``row`` over
    vocabulary chunk ``c``. Each chunk is summed by one program in a fixed order, so the
    walk's ``sum(r)`` of a target row (its chunks added by :func:`_chunk_total`) is the
    same bits on every run."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    o = c * BLOCK_V + tl.arange(0, BLOCK_V)
    r = tl.load(tp_ptr + row * s_tp + o, mask=o < V, other=0.0)
    tl.store(sums_ptr + row * n_chunks + c, tl.sum(r, 0))


@triton.jit
def _chunk_total(sums_ptr, row, n_chunks, BLOCK_C: tl.constexpr):
    offs = tl.arange(0, BLOCK_C)
    return tl.sum(tl.load(sums_ptr + row * n_chunks + offs, mask=offs < n_chunks, other=0.0), 0)


# A single sequential program (grid (1,)): the sweep over the drafts carries six scalars
# (path, current node, count, residual row, where the residual lives, its mass) that change
# inside data-dependent branches; a jit helper cannot assign its caller's variables, so each
# piece would take and return all six. The wrapped signature is 20 of the lines.
# long: one sequential Triton program whose sweep state is rebound in data-dependent branches
@triton.jit(do_not_specialize=["n", "key_acc_i32"])
def _stochastic_walk_kernel(
    tok_ptr,
    par_ptr,
    dp_ptr,
    tp_ptr,
    sums_ptr,
    scratch_ptr,
    state_ptr,
    path_ptr,
    num_ptr,
    n,
    V,
    n_chunks,
    s_dp,
    s_tp,
    key_acc_i32,
    BLOCK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    key_acc = key_acc_i32.to(tl.uint32, bitcast=True)
    offs = tl.arange(0, BLOCK)
    offs_v = tl.arange(0, BLOCK_V)
    path = tl.full([BLOCK], -1, dtype=tl.int64)
    cur = tl.full([], -1, dtype=tl.int32)
    count = tl.full([], 0, dtype=tl.int32)
    # The residual r is target row `row` until the first rejection at that level (its sum then
    # comes from the row-sum pass), then it lives in the scratch buffer.
    row = tl.full([], 0, dtype=tl.int32)
    in_scratch = tl.full([], 0, dtype=tl.int32)
    mass = _chunk_total(sums_ptr, 0, n_chunks, BLOCK_C)
    for c in range(n):
        par = tl.load(par_ptr + c).to(tl.int32)
        if par == cur:
            if in_scratch == 1:
                r_base = scratch_ptr
            else:
                r_base = tp_ptr + row * s_tp
            x = tl.load(tok_ptr + c).to(tl.int32)
            x_ok = (x >= 0) & (x < V)
            qx = tl.load(dp_ptr + c * s_dp + x, mask=x_ok, other=0.0)
            rx = tl.load(r_base + x, mask=x_ok, other=0.0)
            u = _uniform(key_acc, c)
            if u * qx * mass < rx:
                path = tl.where(offs == count, c, path)
                count += 1
                cur = c
                row = c + 1
                in_scratch = 0
                mass = _chunk_total(sums_ptr, row, n_chunks, BLOCK_C)
            else:
                # r = max(r - q_c * sum(r), 0), written to scratch, new sum on the way.
                tl.debug_barrier()  # every thread has read r(x) before r is overwritten
                acc = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, V, BLOCK_V):
                    o = start + offs_v
                    ok = o < V
                    r = tl.load(r_base + o, mask=ok, other=0.0)
                    q = tl.load(dp_ptr + c * s_dp + o, mask=ok, other=0.0)
                    r = tl.maximum(r - q * mass, 0.0)
                    tl.store(scratch_ptr + o, r, mask=ok)
                    acc += r
                mass = tl.sum(acc, 0)
                in_scratch = 1
                tl.debug_barrier()  # the new residual is visible to every thread
    tl.store(path_ptr + offs, path, mask=offs < n)
    tl.store(num_ptr, count.to(tl.int64))
    tl.store(state_ptr, in_scratch)  # where the race's residual lives
    tl.store(state_ptr + 1, row)


@triton.jit(do_not_specialize=["key_res_i32"])
def _race_chunks_kernel(tp_ptr, scratch_ptr, state_ptr, cmax_ptr, cidx_ptr, cnan_ptr, V, s_tp,
                        key_res_i32, BLOCK_V: tl.constexpr):
    """Grid ``(chunks,)``: chunk ``c``'s part of the extra token's race, ``argmax_v r(v) /
    E(v)``, ``E = -log U``: its largest value, the lowest index holding it, and the lowest
    index of a NaN (``2**31 - 1`` when none). Exact per element (IEEE division, no
    reduction of floats), so the chunking does not change the winner."""
    c = tl.program_id(0)
    key_res = key_res_i32.to(tl.uint32, bitcast=True)
    in_scratch = tl.load(state_ptr)
    row = tl.load(state_ptr + 1)
    o = c * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = o < V
    if in_scratch == 1:
        r = tl.load(scratch_ptr + o, mask=ok, other=0.0)
    else:
        r = tl.load(tp_ptr + row * s_tp + o, mask=ok, other=0.0)
    e = -tl.log(_uniform(key_res, o))
    val = tl.div_rn(r, e)
    is_nan = ok & (val != val)
    val = tl.where(ok & (val == val), val, -1.0)
    cmax = tl.max(val, 0)
    tl.store(cmax_ptr + c, cmax)
    tl.store(cidx_ptr + c, tl.min(tl.where(val == cmax, o, 2147483647), 0))
    tl.store(cnan_ptr + c, tl.min(tl.where(is_nan, o, 2147483647), 0))


@triton.jit
def _race_combine_kernel(cmax_ptr, cidx_ptr, cnan_ptr, next_ptr, n_chunks,
                         BLOCK_C: tl.constexpr):
    """The chunks' winners merged as one ordered sweep would: the first NaN (torch.argmax
    semantics: a NaN counts as the maximum), else the largest value, ties to the lowest
    index (the chunks' indices are ordered, so that is the lowest winning index)."""
    offs = tl.arange(0, BLOCK_C)
    m = offs < n_chunks
    cmax = tl.load(cmax_ptr + offs, mask=m, other=-2.0)
    cidx = tl.load(cidx_ptr + offs, mask=m, other=2147483647)
    nan_idx = tl.min(tl.load(cnan_ptr + offs, mask=m, other=2147483647), 0)
    best = tl.max(cmax, 0)
    best_idx = tl.min(tl.where(cmax == best, cidx, 2147483647), 0)
    best_idx = tl.where(nan_idx < 2147483647, nan_idx, best_idx)
    tl.store(next_ptr, best_idx.to(tl.int64))


def _outputs(n: int, device: torch.device):
    path = torch.empty(n, dtype=torch.int64, device=device)
    num = torch.empty((), dtype=torch.int64, device=device)
    nxt = torch.empty((), dtype=torch.int64, device=device)
    return path, num, nxt


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _as_i32(key: int) -> int:
    """A uint32 key as the signed int32 with the same bits (the kernel bitcasts it back)."""
    return key - (1 << 32) if key >= (1 << 31) else key


def greedy_accept(draft_tokens: torch.Tensor, parents: torch.Tensor, target_ids: torch.Tensor):
    """Triton twin of :func:`pipespec_fast.reference.greedy_accept` (one program, no sync)."""
    n = draft_tokens.shape[0]
    path, num, nxt = _outputs(n, draft_tokens.device)
    _greedy_kernel[(1,)](
        draft_tokens, parents, target_ids, path, num, nxt, n, BLOCK=_block(n), num_warps=1
    )
    return path, num, nxt


def stochastic_accept(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    seed: int,
    offset: int,
    *,
    block_v: int | None = None,
):
    """Triton twin of :func:`pipespec_fast.reference.stochastic_accept` (four launches, no
    sync): the target rows' sums over ``(row, vocabulary chunk)`` programs, the walk (one
    program: its rejections rewrite the residual in a ``[V]`` fp32 scratch buffer), the
    extra token's race over chunk programs, and the merge of the chunks' winners.

    ``block_v`` (power of two) is the vocabulary chunk, override for tests. Decisions equal the
    reference's whenever the fp32 sums agree to the last bit; see ``docs/KERNELS.md``.
    """
    n, V = draft_probs.shape
    dev = draft_tokens.device
    path, num, nxt = _outputs(n, dev)
    if draft_probs.stride(-1) != 1:
        draft_probs = draft_probs.contiguous()
    if target_probs.stride(-1) != 1:
        target_probs = target_probs.contiguous()
    if block_v is None:
        block_v = min(2048, max(16, triton.next_power_of_2(V)))
    chunks = triton.cdiv(V, block_v)
    block_c = max(16, triton.next_power_of_2(chunks))
    f32 = dict(dtype=torch.float32, device=dev)
    sums = torch.empty((n + 1, chunks), **f32)
    scratch = torch.empty(V, **f32)
    state = torch.empty(2, dtype=torch.int32, device=dev)
    cmax = torch.empty(chunks, **f32)
    cidx, cnan = (torch.empty(chunks, dtype=torch.int32, device=dev) for _ in range(2))
    key_acc = _as_i32(reference.rng_key(seed, offset, reference.STREAM_ACCEPT))
    key_res = _as_i32(reference.rng_key(seed, offset, reference.STREAM_RESIDUAL))
    # enable_fp_fusion=False: r - q * mass must round twice, like the torch reference
    _row_sums_kernel[(n + 1, chunks)](target_probs, sums, V, target_probs.stride(0), chunks,
                                      BLOCK_V=block_v, num_warps=4, enable_fp_fusion=False)
    _stochastic_walk_kernel[(1,)](
        draft_tokens, parents, draft_probs, target_probs, sums, scratch, state, path, num,
        n, V, chunks, draft_probs.stride(0), target_probs.stride(0), key_acc,
        BLOCK=_block(n), BLOCK_V=block_v, BLOCK_C=block_c, num_warps=4, enable_fp_fusion=False,
    )
    _race_chunks_kernel[(chunks,)](target_probs, scratch, state, cmax, cidx, cnan, V,
                                   target_probs.stride(0), key_res, BLOCK_V=block_v,
                                   num_warps=4, enable_fp_fusion=False)
    _race_combine_kernel[(1,)](cmax, cidx, cnan, nxt, chunks, BLOCK_C=block_c, num_warps=1)
    return path, num, nxt
