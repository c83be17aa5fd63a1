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

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pipespec_fast.kv_cache import KVCache


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


class LlamaStage:
    """Our LLaMA (``models.llama.Transformer``) with a preallocated :class:`KVCache`."""

    def __init__(self, model, name: str = "llama", max_len: int | None = None) -> None:
        self.model = model
        self.name = name
        self.vocab_size = model.config.vocab_size
        self.cache: KVCache = model.new_cache(max_len)
        self.max_len = self.cache.max_len
        self.model_dir: Path | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_len: int | None = None,
        name: str | None = None,
    ) -> LlamaStage:
        from models.llama import Transformer

        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
        stage = cls(model, name=name or Path(model_dir).name, max_len=max_len)
        stage.model_dir = Path(model_dir)
        return stage

    @property
    def cache_len(self) -> int:
        return self.cache.length

    @property
    def device(self) -> torch.device:
        return self.cache.k.device

    def forward(self, tokens, parents=None, last_n=None):
        return self.model(tokens, self.cache, parents=parents, last_n=last_n)

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    def keep_path(self, start, path, num, chain=False):
        self.cache.keep_path(start, path, num, chain)


class HFStage:
    """Adapter for a ``transformers`` causal LM (e.g. ``LlamaForCausalLM``) as a stage.

    Chains only (rollback through the cache's ``crop``); trees would need the model's own 4-D
    masks and are refused with ``NotImplementedError``.
    """

    def __init__(self, model, name: str = "hf", max_len: int | None = None) -> None:
        from transformers import DynamicCache

        self.model = model.eval()
        self.name = name
        self.vocab_size = model.config.vocab_size
        self.max_len = max_len or getattr(model.config, "max_position_embeddings", 2048)
        self._cache_cls = DynamicCache
        self._cache = DynamicCache()
        self._len = 0

    @property
    def cache_len(self) -> int:
        return self._len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, tokens, parents=None, last_n=None):
        if parents is not None:
            raise NotImplementedError("HFStage verifies chains only (parents=None)")
        n = tokens.shape[0]
        if self._len + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self._len} + {n} > max_len {self.max_len}")
        pos = torch.arange(self._len, self._len + n, device=tokens.device)[None]
        out = self.model(
            input_ids=tokens[None], past_key_values=self._cache, position_ids=pos, use_cache=True,
            logits_to_keep=last_n or 0,
        )
        self._cache = out.past_key_values
        self._len += n
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"rollback length {length} outside [0, {self._len}]")
        if length == 0:
            self._cache = self._cache_cls()
        else:
            extra = self._cache.get_seq_length() - length
            if extra > 0:  # transformers >= 5 crops by a negative count of tokens to drop
                self._cache.crop(-extra)
        self._len = length

    def keep_path(self, start, path, num, chain=False):
        if not chain:
            raise NotImplementedError("HFStage keeps chains only")
        self.rollback(start + num)
