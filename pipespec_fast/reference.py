"""Torch references of every kernel: readable, and the ground truth in tests.

Each function here has exactly the contract of its Triton twin in ``csrc_triton/`` (shapes,
dtypes, in-place effects, random numbers). ``pipespec_fast.ops`` dispatches to these on CPU.

Conventions shared by all ops
-----------------------------
* KV cache of one stage: ``k_cache, v_cache: [n_layers, kv_heads, max_len, head_dim]``,
  contiguous; one layer is ``k_cache[layer]`` (``[kv_heads, max_len, head_dim]``).
* A block of ``n`` new tokens (a chain or a tree of drafts) is described by ``parents: [n]``
  int32/int64, topologically ordered: ``parents[i] < i``, ``-1`` for a child of the last
  verified token. A chain is ``parents = [-1, 0, 1, ..., n-2]``. Node ``i`` is stored at cache
  slot ``cache_len + i``; its RoPE position is ``cache_len + depth(i)``.
* ``ancestor_bits: [n, ceil(n/32)]`` int32: bit ``j`` of node ``i`` (word ``j // 32``, bit
  ``j % 32``) is set iff node ``j`` is node ``i`` or one of its ancestors.
* Random numbers are counter based: ``uniform(seed, offset, stream, index)`` is a pure function,
  so a (seed, offset) pair reproduces a run on any backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# ----------------------------------------------------------------------------- tree helpers

MAX_TREE_NODES = 64


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (children of the last verified token have depth 0): ``[n]`` int64."""
    return ancestor_matrix(parents).sum(-1) - 1


def ancestor_bits(parents: torch.Tensor) -> torch.Tensor:
    """Bit-packed ancestor-or-self mask, ``[n] -> [n, ceil(n/32)]`` int32 (see module doc).
    For a chain, :func:`chain_ancestor_bits` gives the same words in closed form."""
    n = parents.shape[0]
    dense = ancestor_matrix(parents)
    words = (n + 31) // 32
    padded = torch.zeros(n, words * 32, dtype=torch.int64, device=parents.device)
    padded[:, :n] = dense.to(torch.int64)
    shifts = torch.arange(32, device=parents.device, dtype=torch.int64)
    packed = (padded.view(n, words, 32) << shifts).sum(-1)
    return _as_int32(packed)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) reinterpreted as signed int32 (their low 32 bits)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def chain_ancestor_bits(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`ancestor_bits` of a chain of ``n`` nodes in closed form: node ``i``'s ancestors
    are nodes ``0..i``, so word ``w`` holds ``clamp(i - 32 w + 1, 0, 32)`` low bits set.
    ``O(n * n / 32)`` integer work, where the general construction's dense squarings cost
    ``O(n^3 log n)`` (a 4k-token prompt is such a chain); no host synchronisation."""
    words = (n + 31) // 32
    i = torch.arange(n, device=device, dtype=torch.int64)[:, None]
    w = torch.arange(words, device=device, dtype=torch.int64)[None, :]
    count = (i - 32 * w + 1).clamp(0, 32)
    return _as_int32((torch.ones_like(count) << count) - 1)


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """Dense ``[n, n]`` bool: ``m[i, j]`` iff ``j`` is ``i`` or an ancestor of ``i``. Built
    from shapes and comparisons only (no ``.any()``, no boolean indexing), so it queues on an
    accelerator without a host synchronisation."""
    n = parents.shape[0]
    p = parents.to(torch.int64)
    idx = torch.arange(n, device=parents.device)
    m = idx[:, None] == idx[None, :]
    # Row i = self + row parents[i]; parents come first, so one ordered sweep suffices.
    # Done as log-depth squaring to avoid a Python loop over nodes. A root's -1 matches no
    # column, so its row of ``par`` stays empty.
    par = p[:, None] == idx[None, :]
    reach = par.clone()
    m = m | reach
    steps = max(1, math.ceil(math.log2(max(n, 2))))
    for _ in range(steps):
        reach = (reach.float() @ reach.float() > 0) | reach
        m = m | reach
    return m


def chain_parents(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Parents of a chain of ``n`` nodes: ``[-1, 0, 1, ..., n-2]`` (int32)."""
    return torch.arange(-1, n - 1, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- 1. attention


def verify_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree/chain verification attention with fused KV append.

    Args:
        q: ``[n, n_heads, head_dim]`` queries of the new tokens (RoPE applied).
        k_new, v_new: ``[n, kv_heads, head_dim]`` keys/values of the new tokens (RoPE applied).
        k_cache, v_cache: ``[kv_heads, max_len, head_dim]`` one layer of the cache. **In place**:
            slots ``[cache_len, cache_len + n)`` are overwritten with ``k_new`` / ``v_new``.
        cache_len: number of valid cached tokens before this block (the prefix): an int, or a
            0-d int32 tensor (read here with ``int()``; the kernels read it on the device).
        anc_bits: ``[n, ceil(n/32)]`` int32 ancestor-or-self bitmask (module doc).
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns:
        ``[n, n_heads, head_dim]`` in ``q.dtype``: node ``i`` (head ``h``) attends to all prefix
        slots and to the new slots of its ancestors and itself, with kv head ``h // (n_heads //
        kv_heads)`` (GQA). Softmax is computed in fp32.
    """
    n, n_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = n_heads // kv_heads
    cache_len = int(cache_len)
    if scale is None:
        scale = head_dim**-0.5
    k_cache[:, cache_len : cache_len + n] = k_new.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, cache_len : cache_len + n] = v_new.transpose(0, 1).to(v_cache.dtype)
    if n == 0:
        return q.new_empty(q.shape)
    total = cache_len + n
    # fp32 math (no copy for fp32 caches). GQA without repeat_interleave: the query heads of
    # one kv head become extra query rows, ordered (g, node): [kv_heads, group * n, D].
    keys = k_cache[:, :total].float()  # [KV, T, D]
    vals = v_cache[:, :total].float()
    qg = q.float().view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(kv_heads, group * n, head_dim)
    mask = None
    if n > 1:  # a single node sees the whole prefix and itself: no mask at all
        # Ancestor-or-self bits -> [n, n] bool (as unpack_bits, in fewer ops), written once
        # per query row (g, node) of a [group, n, total] mask that is True on the prefix.
        j = torch.arange(n, device=q.device, dtype=torch.int32)
        words = anc_bits[:, j >> 5] if anc_bits.shape[1] > 1 else anc_bits
        mask = torch.ones(group, n, total, dtype=torch.bool, device=q.device)
        mask[:, :, cache_len:] = ((words >> (j & 31)) & 1).bool()
        mask = mask.view(group * n, total)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg, keys, vals, attn_mask=mask, scale=scale
    )  # [KV, group * n, D], softmax in fp32
    out = out.view(kv_heads, group, n, head_dim).permute(2, 0, 1, 3)
    return out.reshape(n, n_heads, head_dim).to(q.dtype)


def verify_attention_aligned(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: int,
                             anc_bits: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`verify_attention` with every row computed exactly as one-token decoding computes it
    once its path is in the cache (the contract of batch-invariant mode, ``decoding/captured.py``):
    node ``i`` at depth ``d`` gets :func:`verify_attention` of its one query over the prefix and its
    ancestors' keys at slots ``cache_len .. cache_len + d``, so its bits depend on neither the block
    nor the node's place in it. Chain rows read the cache in place; a tree row whose ancestors are
    not its block's first nodes reads a copy with its path compacted (slow, but
    this is the CPU's reference: the fused C stack serves real models there)."""
    n = q.shape[0]
    k_cache[:, cache_len : cache_len + n] = k_new.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, cache_len : cache_len + n] = v_new.transpose(0, 1).to(v_cache.dtype)
    out = q.new_empty(q.shape)
    one = torch.ones((1, 1), dtype=torch.int32, device=q.device)
    visible = unpack_bits(anc_bits, n)
    for i in range(n):
        path = visible[i].nonzero().flatten()  # ancestors and i, in slot order
        d = path.shape[0] - 1
        kc, vc = k_cache, v_cache
        if d != i:  # not the block's first nodes: the path compacted, in a copy
            kc, vc = torch.empty_like(k_cache), torch.empty_like(v_cache)
            kc[:, : cache_len + d] = torch.cat([k_cache[:, :cache_len],
                                                k_cache[:, cache_len + path[:-1]]], 1)
            vc[:, : cache_len + d] = torch.cat([v_cache[:, :cache_len],
                                                v_cache[:, cache_len + path[:-1]]], 1)
        out[i : i + 1] = verify_attention(q[i : i + 1], k_new[i : i + 1], v_new[i : i + 1], kc, vc,
                                          cache_len + d, one, scale)
    return out


def unpack_bits(anc_bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`ancestor_bits`: ``[n, words]`` int32 -> ``[n, n]`` bool."""
    j = torch.arange(n, device=anc_bits.device)
    words = anc_bits.to(torch.int64)[:, j // 32]  # [n, n]
    return ((words >> (j % 32)) & 1).bool()


# ----------------------------------------------------------------------------- 2. kv cache


def kv_compact(
    k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst_start: int
) -> None:
    """Copy the accepted path's K/V down to contiguous slots, all layers, **in place**.

    Args:
        k_cache, v_cache: ``[n_layers, kv_heads, max_len, head_dim]``.
        src: ``[m]`` int64 strictly increasing slot indices with ``src[i] >= dst_start + i``.
        dst_start: first destination slot; slots ``[dst_start, dst_start + m)`` receive
            ``src``'s entries in order. Overlap between source and destination is allowed.
    Truncation (rollback) is not an op: the owner moves its length pointer.
    """
    m = src.shape[0]
    if m == 0:
        return
    src = src.to(torch.int64)
    # index_select makes a copy (sources may overlap the destination); 5-7x faster on CPU than
    # assigning an advanced-indexing read of the 4-D cache
    k_cache[:, :, dst_start : dst_start + m].copy_(k_cache.index_select(2, src))
    v_cache[:, :, dst_start : dst_start + m].copy_(v_cache.index_select(2, src))


# ----------------------------------------------------------------------------- random numbers

_M32 = 0xFFFFFFFF
STREAM_ACCEPT = 0  # one uniform per draft node: the accept test
STREAM_RESIDUAL = 1  # one uniform per vocab entry: exponential race for the extra token
STREAM_DRAFT = 2  # one uniform per (row, vocab entry): sampling drafts from q


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    x = x ^ (x >> 16)
    return x


def counter_uniform(seed: int, offset: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform in (0, 1), fp32: a pure function of its four arguments.

    ``index`` is an int64 tensor of counters (< 2**32); the result has its shape. The key mixes
    seed, offset and stream with murmur3's finaliser; the same arithmetic (uint32, wrapping) is
    used by the Triton kernels, so both backends draw identical numbers. The top 23 bits plus
    half a step are exact in fp32, so the result is strictly inside (0, 1) and ``-log U > 0``.
    """
    key = rng_key(seed, offset, stream)  # a host int: no upload to index's device
    x = (index.to(torch.int64) * 0x9E3779B1) & _M32
    x = _fmix32(x ^ key)
    x = _fmix32(x ^ 0x5BD1E995)
    return ((x >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def rng_key(seed: int, offset: int, stream: int) -> int:
    """The 32-bit key of ``(seed, offset, stream)`` as a host int: :func:`counter_uniform` and
    the kernels take it as a scalar, so no key tensor is ever uploaded to a device."""
    key = _fmix32(torch.tensor((seed & _M32) ^ 0x9E3779B9, dtype=torch.int64))
    key = _fmix32(key ^ (offset & _M32))
    key = _fmix32(key ^ ((stream * 0x27D4EB2F) & _M32))
    return int(key)


# ----------------------------------------------------------------------------- 3. sampling


def probs_from_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Sampling distribution ``[..., V]`` fp32 from logits with temperature, top-k, top-p.

    Applied identically to draft and verifier. ``temperature == 0`` is greedy: a one-hot of the
    argmax (ties to the lowest index). Top-k keeps the k largest; top-p keeps the smallest set
    of largest-probability tokens whose mass reaches ``top_p`` (the token that crosses it
    included). No host synchronisation.
    """
    x = logits.float()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(torch.float32)
    x = x / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_probs(probs: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """One token per row of ``probs: [m, V]`` -> ``[m]`` int64, by an exponential race.

    ``argmax_v probs[r, v] / E[r, v]`` with ``E = -log(U)``, ``U`` from :func:`counter_uniform`
    (stream ``STREAM_DRAFT``, index ``r * V + v``); distributed exactly as ``probs[r]``.
    """
    m, V = probs.shape
    idx = torch.arange(m * V, device=probs.device, dtype=torch.int64).view(m, V)
    e = -torch.log(counter_uniform(seed, offset, STREAM_DRAFT, idx))
    return (probs.float() / e).argmax(-1)


def _children_in_order(parents: list[int], node: int) -> list[int]:
    return [c for c in range(len(parents)) if parents[c] == node]


def greedy_accept(
    draft_tokens: torch.Tensor, parents: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a chain or tree.

    Args:
        draft_tokens: ``[n]`` int64 token of every node.
        parents: ``[n]`` topological parents (module doc).
        target_ids: ``[n + 1]`` int64 verifier argmax: row 0 after the last verified token,
            row ``i + 1`` after node ``i``.

    Returns ``(path, num_accepted, next_token)``: ``path [n]`` int64 accepted node indices in
    order, padded with -1; ``num_accepted`` 0-d int64; ``next_token`` 0-d int64 (the
    verifier's token after the accepted path: the correction, or the bonus when a leaf was
    reached). At each node the first child (lowest index) equal to the target's argmax is
    taken.
    """
    n = draft_tokens.shape[0]
    toks = draft_tokens.tolist()
    par = [int(p) for p in parents.tolist()]
    tgt = target_ids.tolist()
    path: list[int] = []
    cur = -1
    while True:
        want = tgt[cur + 1]
        nxt = next((c for c in _children_in_order(par, cur) if toks[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
        cur = nxt
    out = torch.full((n,), -1, dtype=torch.int64, device=draft_tokens.device)
    if path:
        out[: len(path)] = torch.tensor(path, dtype=torch.int64)
    dev = draft_tokens.device
    return (
        out,
        torch.tensor(len(path), dtype=torch.int64, device=dev),
        torch.tensor(tgt[cur + 1], dtype=torch.int64, device=dev),
    )


def _race(r: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The extra token of :func:`stochastic_accept`: ``argmax_v r(v) / E(v)``."""
    idx = torch.arange(r.shape[0], device=r.device)
    return (r / -torch.log(counter_uniform(seed, offset, STREAM_RESIDUAL, idx))).argmax()


def stochastic_accept(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    seed: int,
    offset: int,
    residual_race: Callable[[torch.Tensor, int, int], int] | None = None,
    accept_uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling over a chain or tree (recursive rejection sampling).

    Args:
        draft_tokens: ``[n]`` int64.
        parents: ``[n]`` topological parents.
        draft_probs: ``[n, V]`` fp32; row ``i`` is the distribution node ``i`` was drawn from
            (given its parent), independently of its siblings.
        target_probs: ``[n + 1, V]`` fp32 verifier distributions: row 0 after the last verified
            token, row ``i + 1`` after node ``i`` (already tempered / top-k / top-p).
        seed, offset: counter-based RNG key (module doc).
    Algorithm: start at the root with residual ``r = target_probs[0]``. Try the children of
    the current node in index order; child ``c`` with token ``x`` is accepted iff
    ``U_c * q_c(x) * sum(r) < r(x)`` (``U_c`` = uniform of stream ``STREAM_ACCEPT``, index
    ``c``), i.e. with probability ``min(1, p(x)/q_c(x))`` for ``p = r / sum(r)``. On
    acceptance descend: ``r = target_probs[c + 1]``. On rejection ``r = max(r - q_c *
    sum(r), 0)`` and try the next sibling. When no child is accepted (or a leaf is reached) the
    extra token is ``argmax_v r(v) / E(v)``, ``E = -log U`` of stream ``STREAM_RESIDUAL``
    index ``v``. Each sibling step is a standard speculative sampling step aimed at the current
    residual: the emitted tokens are distributed exactly as the verifier's.

    ``residual_race(r, seed, offset) -> int``, ``accept_uniforms`` ``[max(n, 1)]``: that race
    and the accept tests' uniforms computed elsewhere (ops: in C, the same uniforms).
    Returns ``(path, num_accepted, next_token)`` as :func:`greedy_accept`.
    """
    n, dev = draft_probs.shape[0], draft_tokens.device
    toks, par = draft_tokens.tolist(), [int(p) for p in parents.tolist()]
    u_acc = accept_uniforms if accept_uniforms is not None else counter_uniform(
        seed, offset, STREAM_ACCEPT, torch.arange(max(n, 1), device=dev))
    path: list[int] = []  # the accepted nodes; cur: the last of them (-1: the root)
    cur = -1
    r = target_probs[0].float().clone()
    while True:
        accepted = None
        for c in _children_in_order(par, cur):
            x = toks[c]
            q = draft_probs[c].float()
            mass = r.sum()
            if u_acc[c] * q[x] * mass < r[x]:
                accepted = c
                break
            r = torch.clamp(r - q * mass, min=0.0)
        if accepted is None:
            break
        path.append(accepted)
        cur = accepted
        r = target_probs[cur + 1].float().clone()
    nxt = (_race(r, seed, offset) if residual_race is None else
           torch.tensor(residual_race(r, seed, offset), device=dev))
    out = torch.tensor(path + [-1] * (n - len(path)), dtype=torch.int64, device=dev)
    return out, torch.tensor(len(path), dtype=torch.int64, device=dev), nxt.to(torch.int64)
