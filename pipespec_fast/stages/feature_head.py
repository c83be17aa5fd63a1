"""``FeatureHeadStage``: a feature head (``models/feature_head.py``) as the stage below its
target, reading the target's features as the target commits them.

The head's row at position ``q`` needs the target's feature at ``q - 1``. The target stage
publishes its features (``LlamaStage.keep_features``) and how many rows of them are committed
(``features_valid``: rows it will never rewrite). A row whose feature is not committed yet (a
draft beyond what the target verified) takes the head's own estimate ``ĝ_{q-1}`` instead; such
rows are computed again, from the target's features, at the head's next forward once the
target has committed them (a cheap batch: one layer). So the head drafts from the target's
own state after every verification, as EAGLE does, whatever the stages' schedule (a
synchronous step, or PipeSpec's threads: the rows it reads are committed, never rewritten).

Rows whose features are all known run as one block; after the first row that needs its own
estimate of the row before, each row runs alone (it needs the previous row's output).
"""

from __future__ import annotations

import torch

from pipespec_fast.stages.base import StageCapabilities


class FeatureHeadStage:
    """A :class:`~pipespec_fast.models.feature_head.FeatureHead` over ``target`` (a
    ``LlamaStage``, the stage it drafts for: its features feed the head)."""

    def __init__(self, head, target, name: str = "feature-head") -> None:
        if target.device.type != "cpu":  # its features are read from host memory, unsynced
            raise ValueError(f"{name}: a feature head reads its target's features in host "
                             f"memory: the target {target.name!r} must run on the CPU (it is "
                             f"on {target.device})")
        self.head = head
        self.model = head.body  # compute modes and weights: set like any draft's
        self.target = target
        self.name = name
        self.vocab_size = head.config.vocab_size
        self.max_len = target.max_len
        self.cache = head.new_cache(self.max_len)
        self.features = target.keep_features()  # [slots, dim], the target's, shared
        dim = head.config.dim
        self._own = torch.zeros(self.max_len, dim)  # ĝ of each cached row
        self._ids = torch.zeros(self.max_len, dtype=torch.int64)  # each cached row's token
        self._real = 0  # rows [0, _real) were computed from the target's features alone
        self._zero = torch.zeros(1, dim)
        self._num_params = sum(p.numel() for p in head.body.parameters()) + \
            head.fc_weight.numel() + head.fc_bias.numel()

    @property
    def capabilities(self) -> StageCapabilities:
        return StageCapabilities(eos_token_ids=self.target.capabilities.eos_token_ids,
                                 num_params=self._num_params)

    @property
    def cache_len(self) -> int:
        return self.cache.length

    @property
    def device(self) -> torch.device:
        return self.cache.k.device

    def forward(self, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                last_n: int | None = None) -> torch.Tensor:
        """``[last_n or n, vocab_size]`` logits of ``tokens: [n]`` after the cached rows; rows
        cached from the head's own estimates whose target features are committed now are
        computed again first."""
        if parents is not None:
            raise NotImplementedError(f"{self.name}: a feature head runs chains, not trees")
        n = tokens.shape[0]
        last_n = n if last_n is None else last_n
        start = self.cache.length
        redo = min(self._real, start)
        valid = self.target.features_valid  # read once: the target's thread moves it
        if redo < start and redo <= valid:  # estimates the target has replaced since
            self.cache.rollback(redo)
            ids = torch.cat([self._ids[redo:start], tokens.cpu()])
        else:
            redo, ids = start, tokens.cpu()
        try:
            logits = self._run(ids, redo, valid, last_n)
        except BaseException:  # keep the rows before the failed ones, as they were
            self.rollback(min(redo, self.cache.length))
            raise
        return logits.to(tokens.device)

    def _run(self, ids: torch.Tensor, at: int, valid: int, last_n: int) -> torch.Tensor:
        """Rows ``[at, at + len(ids))`` (``ids: [m]``): a block while the target's committed
        features reach, then one row at a time on the head's own estimates; returns the last
        ``last_n`` rows' logits ``[last_n, vocab_size]``."""
        m = ids.shape[0]
        known = max(0, min(m, valid + 1 - at))  # rows q with q - 1 < valid (or q = 0)
        out = []
        if known:
            out.append(self._block(ids[:known], at, True, max(0, last_n - (m - known))))
        for i in range(known, m):
            out.append(self._block(ids[i:i + 1], at + i, False, 1 if m - i <= last_n else 0))
        return torch.cat(out)

    def _block(self, ids: torch.Tensor, at: int, real: bool, last_n: int) -> torch.Tensor:
        """One head forward of rows ``[at, at + n)`` (``ids: [n]``) reading the target's
        features (``real``) or the head's own ``ĝ`` of each row before; returns the last
        ``last_n`` rows' logits (none computed for 0)."""
        n = ids.shape[0]
        src = self.features if real else self._own
        prev = src[max(at - 1, 0):at - 1 + n]
        feats = prev if at > 0 else torch.cat([self._zero, prev])
        logits, g = self.head.forward(ids, feats, self.cache, last_n=last_n)
        self._own[at:at + n] = g
        self._ids[at:at + n] = ids
        if real and self._real >= at:
            self._real = at + n
        return logits

    def rollback(self, length: int) -> None:
        """Forget rows at and after ``length`` (and that they were computed at all)."""
        self.cache.rollback(length)
        self._real = min(self._real, length)

    def keep_path(self, start, path, num, chain=False):
        """Chains only: keep ``num`` rows from ``start`` (= ``rollback(start + num)``)."""
        if not chain:
            raise NotImplementedError(f"{self.name}: a feature head keeps chains, not trees")
        self.rollback(start + num)
