"""The ``Stage`` protocol (what a model must offer to sit in a pipeline) and its implementations.

A stage owns a model and its KV cache. Its contract, for a block of ``n`` new tokens:

* ``forward(tokens, parents=None, last_n=None)`` runs them as a chain (or a tree given by
  ``parents``) after the ``cache_len`` cached tokens, appends their K/V (node ``i`` at slot
  ``cache_len + i``) and returns fp32 logits ``[last_n or n, vocab_size]``;
* ``rollback(length)`` forgets cached tokens at and after ``length``;
* ``keep_path(start, path, num, chain)`` keeps tree nodes ``path[:num]`` contiguously from slot
  ``start`` (see :meth:`KVCache.keep_path`).

Other runtimes plug in by implementing this protocol (see :class:`HFStage`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Stage(Protocol):
    name: str
    vocab_size: int
    max_len: int

    @property
    def cache_len(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def forward(
        self, tokens: torch.Tensor, parents: torch.Tensor | None = None, last_n: int | None = None
    ) -> torch.Tensor: ...

    def rollback(self, length: int) -> None: ...

    def keep_path(self, start: int, path: torch.Tensor, num: int, chain: bool = False) -> None: ...


def is_model_free(stage) -> bool:
    """A stage whose proposals cost next to nothing (declares ``model_free = True``)."""
    return bool(getattr(stage, "model_free", False))
