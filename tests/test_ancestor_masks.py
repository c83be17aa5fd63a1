"""Ancestor masks without dense matmuls for chains, and mask building / random numbers that
queue on an accelerator without a host synchronisation, proved on CPU: the functions run on
the meta device (no data-dependent host read is possible there) and move no data between
devices (a dispatch-level log of every op)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipespec_fast import reference


def old_ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """The construction before the closed form (boolean indexing, ``valid.any()``)."""
    n = parents.shape[0]
    p = parents.to(torch.int64)
    m = torch.eye(n, dtype=torch.bool)
    par = torch.zeros(n, n, dtype=torch.bool)
    valid = p >= 0
    if valid.any():
        par[torch.arange(n)[valid], p[valid]] = True
    reach = par.clone()
    m = m | reach
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        reach = (reach.float() @ reach.float() > 0) | reach
        m = m | reach
    return m


def pack(dense: torch.Tensor) -> torch.Tensor:
    """[n, n] bool -> [n, ceil(n/32)] int32 words, bit j % 32 of word j // 32 (Python ints)."""
    n = dense.shape[0]
    rows = []
    for i in range(n):
        words = []
        for w in range((n + 31) // 32):
            v = sum(1 << b for b in range(32) if 32 * w + b < n and dense[i, 32 * w + b])
            words.append(v - (1 << 32) if v >= 1 << 31 else v)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32).view(n, (n + 31) // 32)


def random_tree(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([int(torch.randint(-1, i, (1,), generator=g)) for i in range(n)],
                        dtype=torch.int32)


@pytest.mark.parametrize("n", list(range(0, 65)) + [65, 96, 100, 257])
def test_chain_closed_form_equals_the_old_construction(n):
    par = reference.chain_parents(n)
    want = pack(old_ancestor_matrix(par))
    got = reference.chain_ancestor_bits(n)
    assert got.dtype == torch.int32 and got.shape == (n, (n + 31) // 32)
    assert torch.equal(got, want)
    assert torch.equal(reference.ancestor_bits(par), want)


@pytest.mark.parametrize("seed", range(40))
def test_trees_equal_the_old_construction(seed):
    n = [1, 2, 7, 31, 32, 33, 63, 64][seed % 8]
    par = random_tree(n, seed)
    old = old_ancestor_matrix(par)
    assert torch.equal(reference.ancestor_matrix(par), old)
    assert torch.equal(reference.ancestor_bits(par), pack(old))
    assert torch.equal(reference.tree_depths(par), old.sum(-1) - 1)


def test_the_model_uses_the_closed_form_for_chains():
    from pipespec_fast.models.llama import block_layout

    cache: dict = {}
    bits, pos = block_layout(40, 7, None, torch.device("cpu"), cache)
    assert torch.equal(bits, pack(old_ancestor_matrix(reference.chain_parents(40))))
    assert torch.equal(pos, torch.arange(7, 47)) and cache[40] is bits


class DeviceMoves(TorchDispatchMode):
    """Records every op whose tensor inputs and outputs are not all on one device."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.moves.append(f"{func}: {sorted(devices)}")
        return out


def _on_meta_without_moves(fn, *args):
    """``fn`` runs on meta tensors (so it reads no device data on the host) and no op inside it
    crosses devices (so it uploads nothing)."""
    with DeviceMoves() as log:
        out = fn(*args)
    assert log.moves == [], log.moves
    for t in tree_leaves(out):
        assert not isinstance(t, torch.Tensor) or t.device.type == "meta"
    return out


def test_mask_building_queues_without_a_host_sync():
    tree = random_tree(20, 3).to("meta")
    assert _on_meta_without_moves(reference.ancestor_bits, tree).shape == (20, 1)
    assert _on_meta_without_moves(reference.tree_depths, tree).shape == (20,)
    assert _on_meta_without_moves(reference.chain_ancestor_bits, 70, "meta").shape == (70, 3)


def test_old_mask_building_needed_the_host():
    """What the structure test catches: ``valid.any()`` reads device data on the host."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        old_ancestor_matrix(random_tree(5, 1).to("meta"))


def test_random_numbers_upload_nothing():
    """The counter key is a host int (before: a CPU tensor copied to the index's device at
    every call, a synchronous upload on CUDA); same numbers as before."""
    idx = torch.arange(1000, dtype=torch.int64)
    u = reference.counter_uniform(3, 1 << 33, reference.STREAM_DRAFT, idx)
    key = torch.tensor(reference.rng_key(3, 1 << 33, reference.STREAM_DRAFT))
    x = reference._fmix32(reference._fmix32((idx * 0x9E3779B1) & 0xFFFFFFFF ^ key) ^ 0x5BD1E995)
    assert torch.equal(u, ((x >> 9).to(torch.float32) + 0.5) / 8388608.0)
    _on_meta_without_moves(reference.counter_uniform, 3, 4, 1, idx.to("meta"))
    probs = torch.softmax(torch.randn(3, 50), -1).to("meta")
    assert _on_meta_without_moves(reference.sample_from_probs, probs, 5, 6).shape == (3,)
