"""Batch-invariant mode's attention (``aligned``): a chain row's output is the same bits whether the
row is decoded alone or verified at any place of a block of any length, with one split or several
(Triton: compiled on CUDA, the interpreter elsewhere; the reference on CPU, trees too). The default
layout is not: its new-token tiles start at the block, so the check that it differs shows this test
can fail.

In Triton's interpreter ``tl.dot`` is numpy's ``matmul`` (OpenBLAS), whose result for a row
depends on the row's place in the matrix; a GPU's dot computes every output element the same
way wherever it sits (what the GPU check confirms). So here the interpreter's ``matmul`` is
replaced by a fixed-order one, and what is tested is the kernel's own part: tiles, splits and
masks at absolute slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_device import CHOICE, KERNEL_DTYPES, host, on

from pipespec_fast import ops, reference
from pipespec_fast.kernels.verify_attention import verify_attention as triton_attention

KV, GROUP, D, MAX_LEN = 2, 2, 16, 160
TILES = dict(block_n=16, min_split=32)  # small tiles: many tile and split boundaries


def sequence(length: int, dtype, seed: int = 0):
    """Queries, keys and values of ``length`` tokens (as a model would produce them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, KV * GROUP, D, generator=g).to(dtype)
    k = torch.randn(length, KV, D, generator=g).to(dtype)
    v = torch.randn(length, KV, D, generator=g).to(dtype)
    return q, k, v


def chain_block(attend, q, k, v, start: int, n: int, pad: int = 0):
    """Rows ``start .. start + n`` as one chain block (with ``pad`` padding rows after it) on a
    cache holding tokens ``0 .. start``; returns the real rows' outputs on the CPU."""
    dtype = q.dtype
    kc, vc = on(torch.full((KV, MAX_LEN, D), float("nan"), dtype=dtype),
                torch.full((KV, MAX_LEN, D), float("nan"), dtype=dtype))
    kc[:, :start] = on(k[:start].transpose(0, 1))
    vc[:, :start] = on(v[:start].transpose(0, 1))
    rows = slice(start, start + n + pad)
    bits = on(reference.chain_ancestor_bits(n + pad))
    out = attend(on(q[rows]), on(k[rows]), on(v[rows]), kc, vc, start, bits)
    return host(out)[:n]


def _fixed_order_matmul(a, b, dtype=None):
    """``a @ b`` summed over the inner dimension in index order, one row like any other."""
    dt = dtype or np.result_type(a, b)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=dt)
    for k in range(a.shape[1]):
        out = out + a[:, k : k + 1].astype(dt) * b[k : k + 1, :].astype(dt)
    return out


@pytest.fixture
def position_free_dot(monkeypatch):
    if not CHOICE.cuda:
        monkeypatch.setattr(np, "matmul", _fixed_order_matmul)


def triton_aligned(splits: int):
    def attend(q, k, v, kc, vc, start, bits):
        return triton_attention(q, k, v, kc, vc, torch.tensor(start, dtype=torch.int32,
                                                              device=q.device),
                                bits, num_splits=splits, aligned=True, **TILES)
    return attend


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:2])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_aligned_chain_rows_equal_decoding_alone(dtype, splits, position_free_dot):
    attend = triton_aligned(splits)
    q, k, v = sequence(120, dtype, seed=splits)
    alone = [chain_block(attend, q, k, v, p, 1) for p in range(120)]
    for start, n, pad in [(0, 64, 0), (5, 40, 24), (31, 33, 0), (47, 17, 47), (70, 50, 14)]:
        got = chain_block(attend, q, k, v, start, n, pad)
        for i in range(n):
            assert torch.equal(got[i], alone[start + i][0]), (start, n, i)
    # and it is the attention: close to the reference
    want = reference.verify_attention(q[:64], k[:64], v[:64], torch.zeros(KV, MAX_LEN, D,
                                      dtype=dtype), torch.zeros(KV, MAX_LEN, D, dtype=dtype), 0,
                                      reference.chain_ancestor_bits(64))
    got = chain_block(attend, q, k, v, 0, 64)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_default_layout_is_not_invariant(position_free_dot):
    """What the aligned mode fixes: the default kernel tiles a block's new tokens apart from
    the cached prefix, so some row differs from the same token decoded alone."""
    def attend(q, k, v, kc, vc, start, bits):
        return triton_attention(q, k, v, kc, vc, start, bits, num_splits=1, **TILES)

    q, k, v = sequence(100, torch.float32, seed=7)
    got = chain_block(attend, q, k, v, 20, 64)
    alone = [chain_block(attend, q, k, v, 20 + i, 1)[0] for i in range(64)]
    assert any(not torch.equal(got[i], alone[i]) for i in range(64))


def test_reference_aligned_rows_equal_decoding_alone_chains_and_trees():
    """The CPU twin: every row (chain or tree node) equals one-token decoding of that node
    with its path compacted into the cache."""
    def attend(q, k, v, kc, vc, start, bits):
        return ops.verify_attention(q, k, v, kc, vc, start, bits, aligned=True)

    q, k, v = sequence(110, torch.float32, seed=3)
    alone = [chain_block(attend, q, k, v, p, 1)[0] for p in range(110)]
    got = chain_block(attend, q, k, v, 30, 64)
    assert all(torch.equal(got[i], alone[30 + i]) for i in range(64))
    # a tree over tokens 30..: node i's path is a chain of the sequence's tokens, so decoding
    # its path alone is decoding tokens 30 .. 30 + depth(i) with node i's own q/k/v last
    parents = torch.tensor([-1, 0, 0, 1, 2, 3, 3, 6, 4, -1])
    depth = reference.tree_depths(parents)
    idx = torch.tensor([30 + int(d) for d in depth])
    tq, tk, tv = q[idx], k[idx], v[idx]
    kc, vc = torch.empty(KV, MAX_LEN, D), torch.empty(KV, MAX_LEN, D)
    kc[:, :30], vc[:, :30] = k[:30].transpose(0, 1), v[:30].transpose(0, 1)
    out = attend(tq, tk, tv, kc, vc, 30, reference.ancestor_bits(parents))
    for i in range(len(parents)):
        # node i's ancestors are nodes at depths 0..d-1 whose tokens are 30..30+d-1: the same
        # keys as the chain's (they were drawn from the same positions)
        assert torch.equal(out[i], alone[int(idx[i])]), i
