"""``TokenSpan``: a run of tokens with, per token, the distribution row it was drawn from and
whether it is worth verifying.

A stage's sequence, its copy of the stage below's sequence (``Mirror``) and a message between
stages (``Chunk``) all need the three together; keeping them as three lists updated in step by
hand at every site was how they could drift apart. Here every change goes through one method
that changes all three.

The lists stay plain lists, read directly (``span.tokens[i]``) on the decode hot path: a span
adds no object per token, and a slice copies what the three list slices copied before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Row = torch.Tensor | None  # [V] probabilities a token was drawn from; None: not drawn here


class TokenSpan:
    """Tokens, their rows and their confidence flags, always of one length.

    * ``tokens``: token ids.
    * ``rows``: the ``[V]`` probability row each token was drawn from at the stage that made
      it (its ``q`` when the stage above verifies it under sampling); ``None`` for prompt
      tokens, tokens adopted from another stage, and everything under greedy decoding.
    * ``confident``: ``False`` only for a drafter's guesses (an n-gram fallback with no real
      match), which are never sent for verification.
    """

    __slots__ = ("tokens", "rows", "confident", "rows_from")

    def __init__(self, tokens: list[int] | None = None, rows: list[Row] | None = None,
                 confident: list[bool] | None = None) -> None:
        """Wraps the given lists (not copied); missing rows are ``None``, missing flags
        ``True``."""
        self.tokens: list[int] = [] if tokens is None else tokens
        n = len(self.tokens)
        self.rows: list[Row] = [None] * n if rows is None else rows
        self.confident: list[bool] = [True] * n if confident is None else confident
        if len(self.rows) != n or len(self.confident) != n:
            raise ValueError(f"TokenSpan: {n} tokens, {len(self.rows)} rows, "
                             f"{len(self.confident)} flags")
        self.rows_from = 0  # rows before this position are known to be None (forget_rows)

    @classmethod
    def known(cls, tokens: Sequence[int]) -> TokenSpan:
        """Tokens this stage takes as given (a prompt, tokens adopted from another stage):
        a copy, with no rows, all confident."""
        return cls(list(tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, s: slice) -> TokenSpan:
        """``span[a:b]``: a new span of copies of the three list slices."""
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError(f"TokenSpan indices must be contiguous slices, got {s!r}")
        return TokenSpan(self.tokens[s], self.rows[s], self.confident[s])

    def __repr__(self) -> str:
        guesses = [i for i, c in enumerate(self.confident) if not c]
        rows = sum(r is not None for r in self.rows)
        return f"TokenSpan({self.tokens}, rows={rows}, guesses at {guesses})"

    # ------------------------------------------------------------------ changes

    def append(self, token: int, row: Row, confident: bool) -> None:
        """One token a stage drafted itself."""
        self.tokens.append(token)
        self.rows.append(row)
        self.confident.append(confident)

    def extend(self, other: TokenSpan) -> None:
        """Append ``other``'s tokens with their rows and flags."""
        self.tokens.extend(other.tokens)
        self.rows.extend(other.rows)
        self.confident.extend(other.confident)

    def extend_known(self, tokens: list[int], rows: Sequence[Row] | None = None) -> None:
        """Append tokens that are settled for this stage (verified or adopted): confident,
        with their ``rows`` when given (one per token), else none."""
        k = len(tokens)
        self.tokens.extend(tokens)
        self.rows.extend([None] * k if rows is None else rows)
        self.confident.extend([True] * k)

    def truncate(self, at: int) -> None:
        """Drop the tokens at and after position ``at``."""
        del self.tokens[at:]
        del self.rows[at:]
        del self.confident[at:]
        self.rows_from = min(self.rows_from, at)

    def forget_rows(self, before: int) -> None:
        """Drop the rows of the positions before ``before``: nobody will verify those tokens
        again, and each row is a ``[V]`` tensor (a view that keeps its whole ``[n + 1, V]``
        verify output alive): kept for every position, they grew with the sequence (100 MB
        per stage for 512 sampled tokens at V = 49k). Amortised O(1) per position."""
        rows, end = self.rows, min(before, len(self.rows))
        for i in range(self.rows_from, end):
            rows[i] = None
        if end > self.rows_from:
            self.rows_from = end

    # ------------------------------------------------------------------ reading

    def common_prefix(self, tokens: list[int], start: int = 0) -> int:
        """The first position from ``start`` where ``self.tokens`` and ``tokens`` differ, or
        where the shorter one ends (``start`` when it is already past that end): the caller
        knows the two agree before ``start``."""
        mine, a = self.tokens, start
        lim = min(len(mine), len(tokens))
        while a < lim and mine[a] == tokens[a]:
            a += 1
        return a

    def usable(self, start: int, n: int, with_rows: bool = False
               ) -> tuple[list[int], list[Row] | None]:
        """The drafts worth verifying from position ``start``: at most ``n`` tokens, stopping
        before the first guess and, ``with_rows`` (sampling: the verifier needs each draft's
        ``q``), before the first token without a row. Returns ``(tokens, rows)``, ``rows``
        ``None`` unless ``with_rows``."""
        conf, k = self.confident, start
        stop = min(start + max(n, 0), len(conf))
        while k < stop and conf[k]:
            k += 1
        if not with_rows:
            return self.tokens[start:k], None
        rows, j = self.rows, start
        while j < k and rows[j] is not None:
            j += 1
        return self.tokens[start:j], rows[start:j]
