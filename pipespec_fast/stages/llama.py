"""``LlamaStage``: our LLaMA model with a preallocated KV cache as a pipeline stage."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipespec_fast import config as runtime_config
from pipespec_fast.kv_cache import KVCache
from pipespec_fast.stages.base import StageCapabilities
from pipespec_fast.stages.model_tree import chain_tree
from pipespec_fast.stages.tree import DraftTree


class LlamaStage:
    """Our LLaMA (``models.llama.Transformer``) with a preallocated :class:`KVCache`."""

    def __init__(self, model, name: str = "llama", max_len: int | None = None,
                 batch_invariant: bool | None = None) -> None:
        """``batch_invariant`` (default: ``PIPESPEC_BATCH_INVARIANT``): every forward in
        64-row blocks (:meth:`use_captured_steps`); the cache then holds ``MAX_N - 1`` slots
        past ``max_len`` for the last block's padding rows."""
        from pipespec_fast.decoding.captured import MAX_N

        self.model = model
        self.name = name
        self.vocab_size = model.config.vocab_size
        cfg = runtime_config.current()
        self.batch_invariant = cfg.batch_invariant if batch_invariant is None else batch_invariant
        self.max_len = max_len or model.config.max_position_embeddings
        spare = MAX_N - 1 if self.batch_invariant else 0  # the last block's padding rows
        self.cache: KVCache = model.new_cache(self.max_len + spare)
        self.model_dir: Path | None = None
        # counted once, not per read (~0.4 ms over 270 tensors: per token in a decode loop)
        self._num_params = sum(p.numel() for p in model.parameters())
        self.steps = None  # captured steps (decoding/captured.py), when in use
        # the logits of the last forward's last row and the cache length after it, while the
        # cache has not changed since (propose_tree's root)
        self._last_row: torch.Tensor | None = None
        self._last_at = -1
        # (start, end) perf_counter times of the last propose_tree's chain forwards (stats)
        self.tree_step_times: list[tuple[float, float]] = []
        # keep_features: rows [0, features_valid) are committed (rewritten only while a head
        # is idle: a new prompt, the warm-up, a tree draft's rollback)
        self.features: torch.Tensor | None = None
        self.features_valid = 0
        if self.batch_invariant or (self.device.type == "cuda" and cfg.graphs):
            self.use_captured_steps(batch_invariant=self.batch_invariant)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_len: int | None = None,
        name: str | None = None,
    ) -> LlamaStage:
        from pipespec_fast.models.llama import Transformer

        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
        stage = cls(model, name=name or Path(model_dir).name, max_len=max_len)
        stage.model_dir = Path(model_dir)
        return stage

    @property
    def capabilities(self) -> StageCapabilities:
        """Trees (verification attention by ancestor mask, ``KVCache.keep_path``; not in
        batch-invariant mode on CUDA, where a tree's attention is not batch invariant:
        docs/KERNELS.md, "GPU numerics"); tree drafts (:meth:`propose_tree`); the eos ids of
        the model's config, read when a pipeline is built."""
        return StageCapabilities(trees=not (self.batch_invariant and self.device.type == "cuda"),
                                 tree_drafts=True,
                                 eos_token_ids=tuple(self.model.config.eos_token_ids),
                                 num_params=self._num_params)

    @property
    def cache_len(self) -> int:
        return self.cache.length

    @property
    def device(self) -> torch.device:
        return self.cache.k.device

    def use_captured_steps(self, capture: bool | None = None, warm_up: bool = True,
                           batch_invariant: bool = False) -> None:
        """Run blocks of up to 64 tokens as captured steps from now on (``PIPESPEC_GRAPHS=1``
        does this for CUDA stages at load): static shapes in power-of-two buckets, replayed as
        CUDA graphs (``capture``, default on CUDA); ``warm_up`` captures every bucket now, so
        none is captured mid-generation. On the CPU the same steps run eagerly (tests).

        ``batch_invariant`` (``PIPESPEC_BATCH_INVARIANT=1`` at load): one bucket of 64 and
        every block through it, longer ones in chunks, so every product has one shape
        (docs/KERNELS.md, "GPU numerics"); a block that does not fit raises instead of running
        eagerly."""
        from pipespec_fast.decoding.captured import StaticSteps

        self.steps = StaticSteps(self.model, self.cache, capture=capture,
                                 batch_invariant=batch_invariant, limit=self.max_len)
        if warm_up:
            self.steps.warm_up()

    def keep_features(self) -> torch.Tensor:
        """Keep every forward's normalised last-layer outputs, one row per cache slot, for a
        feature head (``stages/feature_head.py``); returns the ``[slots, dim]`` buffer."""
        if self.steps is not None:
            raise ValueError(f"{self.name}: a feature head needs eager forwards, not captured "
                             "steps (PIPESPEC_GRAPHS=0, PIPESPEC_BATCH_INVARIANT=0)")
        if self.features is None:
            self.features = torch.zeros(self.cache.k.shape[2], self.model.config.dim,
                                        device=self.device)
        return self.features

    def forward(self, tokens, parents=None, last_n=None):
        self._last_at = -1
        steps = self.steps
        self.features_valid = self.cache.length  # what it holds before a forward is committed
        if steps is not None and (steps.batch_invariant or steps.fits(tokens.shape[0])):
            logits = steps.forward(tokens, parents=parents, last_n=last_n)
        else:
            logits = self.model(tokens, self.cache, parents=parents, last_n=last_n,
                                features=self.features)
        if parents is None and logits.shape[0] == 1:  # a tree's root, when one is asked for
            self._last_row, self._last_at = logits[0], self.cache.length
        return logits

    def rollback(self, length: int) -> None:
        self._last_at = -1
        self.cache.rollback(length)
        self.features_valid = length

    def keep_path(self, start, path, num, chain=False):
        self._last_at = -1
        self.cache.keep_path(start, path, num, chain)
        if self.features is not None and num > 0 and not chain:
            self.features[start:start + num] = self.features[path[:num].long() + start]
        self.features_valid = start + num

    def propose_tree(self, budget: int, max_depth: int, decay: float = 1.0) -> DraftTree:
        """A token tree continuing the whole history: the model's greedy chain of
        ``max_depth`` tokens with siblings where it is unsure (:func:`chain_tree`), at most
        ``budget`` nodes. Its root is the last forward's last row, which must have fed the
        history's last token (``tree_step.draft_tree`` does; else ``RuntimeError``). The
        chain's K/V are rolled back afterwards: the cache holds the history only."""
        if self._last_at != self.cache.length or self._last_row is None:
            raise RuntimeError(f"{self.name}: propose_tree needs the logits of a forward that "
                               "fed the history's last token (last_n >= 1), none since")
        start = self.cache.length
        root = self._last_row.clone()  # a captured step's output buffer is reused
        self.tree_step_times = times = []

        # one host read per level (the chain's next token; on CUDA a sync each: trees from a
        # model drafter are meant for the CPU, where a verify row is not free but a read is)
        def step(token: int) -> torch.Tensor:
            t = time.perf_counter()
            ids = torch.tensor([token], dtype=torch.int64, device=self.device)
            row = self.forward(ids, last_n=1)[0]
            times.append((t, time.perf_counter()))
            return row

        try:  # no deeper than the budget: deeper chain nodes could not be kept
            return chain_tree(step, root, budget, min(max_depth, budget), decay)
        finally:
            self.rollback(start)
