"""``NGramStage``: a model-free drafter (prompt lookup / n-gram) for the lowest pipeline stage.

It implements the :class:`~pipespec_fast.stages.Stage` protocol with the token history as its
"cache": ``forward(tokens)`` appends tokens, ``rollback(length)`` truncates, and
``cache_len == len(history)``.

Proposal for a position ``p`` (what follows ``history[: p + 1]``): for ``n`` from ``max_ngram``
down to ``min_ngram``, take the suffix ``history[p - n + 1 : p + 1]``; if it occurred earlier
(ending at some ``e < p``), propose ``history[e + 1]`` of the most recent such occurrence. When
no suffix matches, fall back to the token that most often followed ``history[p]`` so far (a
bigram count over ``history[: p + 1]``, ties to the smallest id), else to ``history[p]`` itself.

A logits row is ``0.0`` at the proposal and ``-inf`` elsewhere: greedy takes it and, under
sampling, ``probs_from_logits`` gives a one-hot ``q`` at any temperature / top-k / top-p, with
which speculative sampling stays lossless (the verifier accepts with probability ``p(x)``).

Cost: an index ``n -> {n-gram tuple: ascending end positions}`` updated on every append
(``O(max_ngram)`` dict operations per token) and popped from the back on rollback (stale
positions are always the largest), so a lookup is ``O(max_ngram)`` dict probes plus a bisect,
independent of the history's length. Bigram counts ``prev -> {next: count}`` are maintained
the same way.
"""

from __future__ import annotations

import operator
from bisect import bisect_left

import torch

from pipespec_fast.stages.base import StageCapabilities

NEG_INF = float("-inf")


class NGramStage:
    """Prompt-lookup drafter implementing the Stage protocol (chains only).

    Args:
        vocab_size: the target's vocabulary size (logits rows are this wide).
        max_len: most tokens the history may hold (like a KV cache's capacity).
        max_ngram, min_ngram: longest / shortest suffix tried (``1 <= min <= max``).
        name, device: stage name; device the logits are returned on.

    After each ``forward``, ``last_match_len`` is the suffix length that produced the last
    row's proposal (``0`` for a fallback) and ``last_proposals`` the proposed token per
    returned row; ``proposals`` / ``matched`` count rows proposed / proposed by a real match.
    """

    # proposals cost microseconds (run inline, fill leads at once); fallbacks are guesses
    # (last_match_len < min_confident_match); clone() gives the skip-level copy; chains only
    capabilities = StageCapabilities(model_free=True, confidence=True, clone=True)

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 4096,
        max_ngram: int = 4,
        min_ngram: int = 1,
        name: str = "ngram",
        device: torch.device | str = "cpu",
        min_confident_match: int = 1,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if not isinstance(min_ngram, int) or min_ngram < 1:
            raise ValueError(f"min_ngram must be an integer >= 1, got {min_ngram!r}")
        if not isinstance(max_ngram, int) or max_ngram < min_ngram:
            raise ValueError(
                f"max_ngram must be an integer >= min_ngram ({min_ngram}), got {max_ngram!r}"
            )
        self.name = name
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # proposals from a match shorter than this are guesses, never sent for verification
        self.min_confident_match = min_confident_match
        self.model_free = True  # proposals cost microseconds: run inline, fill leads at once
        self._device = torch.device(device)
        self.history: list[int] = []
        # _index[n - min_ngram]: n-gram tuple -> ascending positions where it ends
        self._index: list[dict[tuple[int, ...], list[int]]] = [
            {} for _ in range(min_ngram, max_ngram + 1)
        ]
        self._bigram: dict[int, dict[int, int]] = {}
        self.last_match_len = 0
        self.last_proposals: list[int] = []
        self.proposals = 0
        self.matched = 0

    def clone(self) -> NGramStage:
        """A drafter with the same settings and an empty history."""
        return NGramStage(self.vocab_size, self.max_len, self.max_ngram, self.min_ngram,
                          self.name, self._device, self.min_confident_match)

    # ------------------------------------------------------------------ Stage protocol

    @property
    def cache_len(self) -> int:
        return len(self.history)

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, tokens, parents=None, last_n: int | None = None) -> torch.Tensor:
        """Append ``tokens`` and return ``[last_n or n, vocab_size]`` fp32 rows (0 / -inf)."""
        if parents is not None:
            raise NotImplementedError("NGramStage drafts chains only (parents=None)")
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1:
                raise ValueError(f"tokens: expected a 1-D tensor, got shape {tuple(tokens.shape)}")
            toks = tokens.tolist()
        else:
            toks = [int(t) for t in tokens]
        n = len(toks)
        rows = n if last_n is None else last_n
        if not 0 <= rows <= n:
            raise ValueError(f"last_n must be in [0, {n}] for {n} tokens, got {last_n!r}")
        if n and (min(toks) < 0 or max(toks) >= self.vocab_size):
            raise ValueError(f"tokens: ids outside the vocab [0, {self.vocab_size})")
        if len(self.history) + n > self.max_len:
            raise ValueError(
                f"history overflow: {len(self.history)} + {n} > max_len {self.max_len}"
            )
        for t in toks:
            self._append(t)
        end = len(self.history)
        props: list[int] = []
        match = 0
        for p in range(end - rows, end):
            tok, match = self.propose_at(p)
            props.append(tok)
            self.matched += match > 0
        self.proposals += rows
        self.last_proposals = props
        if rows:
            self.last_match_len = match
        out = torch.full((rows, self.vocab_size), NEG_INF, dtype=torch.float32, device=self._device)
        if rows == 1:
            out[0, props[0]] = 0.0
        elif rows:
            out[torch.arange(rows), torch.tensor(props, device=self._device)] = 0.0
        return out

    def rollback(self, length: int) -> None:
        """Forget the history at and after ``length``."""
        h = self.history
        length = operator.index(length)
        if not 0 <= length <= len(h):
            raise ValueError(f"rollback length {length!r} outside [0, {len(h)}]")
        if length == 0:
            h.clear()
            for d in self._index:
                d.clear()
            self._bigram.clear()
            return
        lo = self.min_ngram
        for e in range(len(h) - 1, length - 1, -1):
            for n, d in enumerate(self._index, lo):
                if n > e + 1:
                    break
                key = tuple(h[e - n + 1 : e + 1])
                lst = d[key]
                lst.pop()  # e is the largest position stored: positions ascend
                if not lst:
                    del d[key]
            if e:
                f = self._bigram[h[e - 1]]
                c = f[h[e]] - 1
                if c:
                    f[h[e]] = c
                else:
                    del f[h[e]]
                    if not f:
                        del self._bigram[h[e - 1]]
        del h[length:]

    def keep_path(self, start: int, path, num: int, chain: bool = False) -> None:
        """Chains only: keep ``num`` tokens from ``start`` (= ``rollback(start + num)``)."""
        if not chain:
            raise NotImplementedError("NGramStage keeps chains only (chain=True)")
        self.rollback(start + num)

    # ------------------------------------------------------------------ lookup

    def _append(self, t: int) -> None:
        h = self.history
        h.append(t)
        e = len(h) - 1
        for n, d in enumerate(self._index, self.min_ngram):
            if n > e + 1:
                break
            key = tuple(h[e - n + 1 :])
            lst = d.get(key)
            if lst is None:
                d[key] = [e]
            else:
                lst.append(e)
        if e:
            f = self._bigram.get(h[e - 1])
            if f is None:
                self._bigram[h[e - 1]] = {t: 1}
            else:
                f[t] = f.get(t, 0) + 1

    def propose_at(self, p: int) -> tuple[int, int]:
        """``(token, match_len)`` to follow ``history[: p + 1]`` (``match_len`` 0: fallback)."""
        h = self.history
        if not 0 <= p < len(h):
            raise ValueError(f"position {p} outside the history [0, {len(h)})")
        last = len(h) - 1
        lo = self.min_ngram
        for n in range(min(self.max_ngram, p + 1), lo - 1, -1):
            lst = self._index[n - lo].get(tuple(h[p - n + 1 : p + 1]))
            if lst is None:
                continue
            if p == last:  # the common case: p itself is the largest position stored
                if len(lst) > 1:
                    return h[lst[-2] + 1], n
                continue
            i = bisect_left(lst, p)
            if i:
                return h[lst[i - 1] + 1], n
        return self._fallback(p), 0

    def _fallback(self, p: int) -> int:
        h = self.history
        t = h[p]
        f = self._bigram.get(t)
        if f and p < len(h) - 1:  # discount pairs after position p
            f = dict(f)
            for i in range(p, len(h) - 1):
                if h[i] == t:
                    f[h[i + 1]] -= 1
            f = {k: v for k, v in f.items() if v}
        if not f:
            return t
        return min(f.items(), key=lambda kv: (-kv[1], kv[0]))[0]
