"""Preallocated per-stage KV cache with a length pointer.

Layout (shared with the kernels): ``k, v: [n_layers, kv_heads, max_len, head_dim]``, contiguous,
allocated once. ``length`` counts the valid slots. Rollback moves the pointer (no copy);
accepting a tree path compacts its entries in place with one ``kv_compact`` launch for all
layers, then moves the pointer.

**Unwritten slots are never read**, so the storage is allocated uninitialised
(``torch.empty``), not zeroed: a large allocation then stays untouched virtual memory, and the
process grows by the pages of slots actually written (about 16 slots per 4 KiB page of one
layer and head) instead of the whole ``max_len`` up front (the default target's cache is 94 MB,
of which a 600-token sequence writes ~30%). Every reader respects ``length``: the attention
paths (``reference.verify_attention``, the C layers, the Triton kernel) read slots
``[0, cache_len + n)`` after writing ``[cache_len, cache_len + n)``, and ``kv_compact`` copies
slots of the block just written; a cache filled with NaN before use gives the same logits
bit for bit (``tests/test_model.py``).
"""

from __future__ import annotations

import torch

from pipespec_fast import ops


class KVCache:
    """K/V storage of one stage. ``length`` is the number of valid slots."""

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, kv_heads, max_len, head_dim)
        # uninitialised on purpose: no slot is read before it is written (module doc)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[kv_heads, max_len, head_dim]`` of layer ``i`` (no copy)."""
        return self.k[i], self.v[i]

    def reserve(self, n: int) -> int:
        """Claim ``n`` slots after the valid ones; returns their first index."""
        start = self.length
        if start + n > self.max_len:
            raise ValueError(
                f"KV cache overflow: {start} cached + {n} new tokens > max_len {self.max_len}"
            )
        self.length = start + n
        return start

    def rollback(self, length: int) -> None:
        """Forget every slot at and after ``length`` (pointer move, no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback length {length} outside [0, {self.length}]")
        self.length = length

    def keep_path(self, start: int, path: torch.Tensor, num: int, chain: bool = False) -> None:
        """Keep tree nodes ``path[:num]`` (node ``j`` lives at slot ``start + j``) contiguously.

        Afterwards slots ``[start, start + num)`` hold the path's K/V in order and
        ``length = start + num``. ``path`` is a device tensor; ``num`` a host int. For a chain
        the accepted nodes already sit in place (``path[j] == j``): only the pointer moves.
        """
        if num > 0 and not chain:
            src = path[:num].to(torch.int64) + start
            ops.kv_compact(self.k, self.v, src, start)
        self.length = start + num
