"""``NGramStage``: a model-free drafter (prompt lookup / n-gram) for the lowest pipeline stage.

It implements the :class:`~pipespec_fast.stages.Stage` protocol with the token history as its
"cache": ``forward(tokens)`` appends tokens, ``rollback(length)`` truncates, and
``cache_len == len(history)``.

Proposal for a position ``p`` (what follows ``history[: p + 1]``): for ``n`` from ``max_ngram``
down to ``min_ngram``, take the suffix ``history[p - n + 1 : p + 1]``; if it occurred earlier
(ending at some ``e < p``), propose ``history[e + 1]`` of the most recent such occurrence. With
a ``store`` (the target's own answers to other prompts, ``stages/ngram_store.py``), a suffix
of two or more tokens still comes first, then the store's longest matching context, then a
one-token suffix (``stages/ngram_index.py``). When nothing matches, fall back to the token
that most often followed ``history[p]`` so far (a bigram count over ``history[: p + 1]``, ties
to the smallest id), else to ``history[p]`` itself.

A logits row is ``0.0`` at the proposal and ``-inf`` elsewhere: greedy takes it and, under
sampling, ``probs_from_logits`` gives a one-hot ``q`` at any temperature / top-k / top-p, with
which speculative sampling stays lossless (the verifier accepts with probability ``p(x)``).

The history and its lookup index are a :class:`~pipespec_fast.stages.ngram_index.SuffixIndex`
(``O(max_ngram)`` per appended token and per lookup, whatever the history's length); this class
adapts it to the Stage protocol.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch

from pipespec_fast.stages.base import StageCapabilities
from pipespec_fast.stages.ngram_index import SuffixIndex
from pipespec_fast.stages.ngram_store import NGramStore
from pipespec_fast.stages.ngram_tree import ngram_tree
from pipespec_fast.stages.tree import DraftTree

NEG_INF = float("-inf")


class NGramStage:
    """Prompt-lookup drafter implementing the Stage protocol: chains through ``forward``, and
    token trees through ``propose_tree`` (every distinct continuation of the matched suffix:
    ``stages/ngram_tree.py``).

    Args:
        vocab_size: the target's vocabulary size (logits rows are this wide).
        max_len: most tokens the history may hold (like a KV cache's capacity).
        max_ngram, min_ngram: longest / shortest suffix tried (``1 <= min <= max``).
        name, device: stage name; device the logits are returned on.
        store: an :class:`~pipespec_fast.stages.ngram_store.NGramStore` (the target's own
            answers to other prompts) consulted where this text has no match of two tokens or
            more (``ngram_index``); shared, read only, by clones.

    After each ``forward``, ``last_match_len`` is the suffix length that produced the last
    row's proposal (``0`` for a fallback) and ``last_proposals`` the proposed token per
    returned row; ``proposals`` / ``matched`` count rows proposed / proposed by a real match.
    """

    # proposals cost microseconds (run inline, fill leads at once); fallbacks are guesses
    # (last_match_len < min_confident_match); clone() gives the skip-level copy; it drafts
    # trees (propose_tree) but verifies nothing
    capabilities = StageCapabilities(model_free=True, confidence=True, clone=True,
                                     tree_drafts=True)

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 4096,
        max_ngram: int = 4,
        min_ngram: int = 1,
        name: str = "ngram",
        device: torch.device | str = "cpu",
        min_confident_match: int = 1,
        store: NGramStore | None = None,
    ) -> None:
        _check_args(vocab_size, max_len, max_ngram, min_ngram, store)
        self.name = name
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # proposals from a match shorter than this are guesses, never sent for verification
        self.min_confident_match = min_confident_match
        self._device = torch.device(device)
        self.index = SuffixIndex(min_ngram, max_ngram, store)  # the history and its lookup
        self.last_match_len = 0
        self.last_proposals: list[int] = []
        self.proposals = 0
        self.matched = 0

    store = property(lambda self: self.index.store, doc="The store it consults (read only).")

    def clone(self, store: NGramStore | None | Literal[True] = True) -> NGramStage:
        """A drafter with the same settings and an empty history (``store``: ``True`` shares
        this one's, else the store to use, ``None`` for none)."""
        return NGramStage(self.vocab_size, self.max_len, self.max_ngram, self.min_ngram,
                          self.name, self._device, self.min_confident_match,
                          self.store if store is True else store)

    def without_store(self) -> NGramStage:
        """:meth:`clone` with no store: prompt lookup alone."""
        return self.clone(store=None)

    @property
    def history(self) -> list[int]:
        """The tokens appended and not rolled back (the drafter's "cache")."""
        return self.index.tokens

    @property
    def cache_len(self) -> int:
        return len(self.index.tokens)

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, tokens, parents=None, last_n: int | None = None) -> torch.Tensor:
        """Append ``tokens`` and return ``[last_n or n, vocab_size]`` fp32 rows (0 / -inf)."""
        if parents is not None:
            raise NotImplementedError("NGramStage drafts chains only (parents=None)")
        if isinstance(tokens, torch.Tensor) and tokens.dim() != 1:
            raise ValueError(f"tokens: expected a 1-D tensor, got shape {tuple(tokens.shape)}")
        toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else [int(t) for t in tokens]
        props = self._extend(toks, len(toks) if last_n is None else last_n)
        rows = len(props)
        out = torch.full((rows, self.vocab_size), NEG_INF, dtype=torch.float32, device=self._device)
        if rows == 1:
            out[0, props[0]] = 0.0
        elif rows:
            out[torch.arange(rows), torch.tensor(props, device=self._device)] = 0.0
        return out

    def propose(self, tokens: list[int]) -> int:
        """``forward(tokens, last_n=1)``'s proposal without its row (``Sequencer.draft``'s
        fast path: no vocabulary-wide row to build, then take the argmax of or draw from)."""
        return self._extend([int(t) for t in tokens], 1)[0]

    def _extend(self, toks: list[int], rows: int) -> list[int]:
        """Append ``toks``; the proposals after each of the last ``rows`` positions."""
        index = self.index
        _check_feed(toks, rows, self.vocab_size, len(index), self.max_len)
        for t in toks:
            index.append(t)
        end = len(index)
        props: list[int] = []
        match = 0
        for p in range(end - rows, end):
            tok, match = index.propose_at(p)
            props.append(tok)
            self.matched += match > 0
        self.proposals += rows
        self.last_proposals = props
        self.last_match_len = match if rows else self.last_match_len
        return props

    def rollback(self, length: int) -> None:
        """Forget the history at and after ``length``."""
        length = operator.index(length)
        if not 0 <= length <= len(self.index):
            raise ValueError(f"rollback length {length!r} outside [0, {len(self.index)}]")
        self.index.truncate(length)

    def keep_path(self, start: int, path, num: int, chain: bool = False) -> None:
        """Chains only: keep ``num`` tokens from ``start`` (= ``rollback(start + num)``)."""
        if not chain:
            raise NotImplementedError("NGramStage keeps chains only (chain=True)")
        self.rollback(start + num)

    def propose_tree(self, budget: int, max_depth: int, decay: float = 1.0,
                     max_occurrences: int = 32) -> DraftTree:
        """A token tree continuing the whole history: the trie of what followed the
        ``max_occurrences`` most recent earlier occurrences of the longest matched suffix, cut
        to its ``budget`` most likely nodes (``decay``: the verifier's per-level acceptance)
        and ``max_depth`` levels (:func:`~pipespec_fast.stages.ngram_tree.ngram_tree`). Empty
        when no suffix of at least ``min_confident_match`` tokens occurred before: no guesses
        in a tree."""
        tree, match = ngram_tree(self.index, budget, max_depth, max_occurrences,
                                 self.min_confident_match, decay)
        self.last_match_len = match
        self.proposals += len(tree)
        self.matched += len(tree)
        return tree

    def propose_at(self, p: int) -> tuple[int, int]:
        """``(token, match_len)`` to follow ``history[: p + 1]`` (``match_len`` 0: fallback)."""
        return self.index.propose_at(p)


def _check_feed(toks: list[int], rows: int, vocab_size: int, have: int, max_len: int) -> None:
    """``forward``'s tokens and ``last_n`` (``rows``) for a history of ``have`` tokens."""
    n = len(toks)
    if not 0 <= rows <= n:
        raise ValueError(f"last_n must be in [0, {n}] for {n} tokens, got {rows!r}")
    if n and (min(toks) < 0 or max(toks) >= vocab_size):
        raise ValueError(f"tokens: ids outside the vocab [0, {vocab_size})")
    if have + n > max_len:
        raise ValueError(f"history overflow: {have} + {n} > max_len {max_len}")


def _check_args(vocab_size, max_len, max_ngram, min_ngram, store) -> None:
    """``NGramStage``'s arguments, each refused with an error naming it."""
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
    if store is not None:
        if not isinstance(store, NGramStore):
            raise TypeError(f"store must be an NGramStore, got {type(store).__name__}")
        if store.vocab_size != vocab_size:
            raise ValueError(f"store: made for a vocabulary of {store.vocab_size} tokens, "
                             f"the drafter's is {vocab_size}")
