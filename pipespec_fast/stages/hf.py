"""``HFStage``: a ``transformers`` causal LM as a pipeline stage (chains only)."""

from __future__ import annotations

import torch

from pipespec_fast.stages.base import StageCapabilities


class HFStage:
    """Adapter for a ``transformers`` causal LM (e.g. ``LlamaForCausalLM``) as a stage.

    Chains only (rollback through the cache's ``crop``); trees would need the model's own 4-D
    masks and are refused with ``NotImplementedError``.
    """

    def __init__(self, model, name: str = "hf", max_len: int | None = None) -> None:
        from transformers import DynamicCache

        # chains only; no eos ids declared (transformers configs spell them differently): the
        # pipeline's come from its tokenizer or its ``eos_token_ids`` argument
        self.capabilities = StageCapabilities(
            num_params=sum(p.numel() for p in model.parameters()))
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
