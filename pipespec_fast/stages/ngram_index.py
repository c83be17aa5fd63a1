"""``SuffixIndex``: a token sequence indexed for prompt lookup, the n-gram drafter's data.

The drafter (:class:`~pipespec_fast.stages.ngram.NGramStage`) asks one question per proposed
row: what followed the most recent earlier occurrence of the current suffix? Scanning the
history would cost its length per proposal, and a pipeline asks after every committed token, so
the answer is kept ready instead:

* ``ends[n - min_n]``: each n-gram of the sequence (a tuple) -> the ascending positions where it
  ends, for ``min_n <= n <= max_n``;
* ``followers``: each token -> ``{next token: count}`` over the sequence (the bigram counts the
  fallback uses when no suffix matches).

Appending a token adds ``max_n - min_n + 1`` positions and one count. Truncation is the other
way round: the positions to drop are always the largest of their lists, so they are popped from
the back. A lookup is ``O(max_n)`` dict probes plus a bisect, whatever the sequence's length
(and, with a store, its own ``O(max_order)`` hashes and bisects).

With a ``store`` (:class:`~pipespec_fast.stages.ngram_store.NGramStore`, the target's own
answers to other prompts), a suffix of at least :data:`CONTEXT_FIRST` tokens that occurred
earlier in this text still proposes first; where none did, the store's longest matching
context proposes before a one-token suffix of this text does. On held-out answers (not the
benchmarks') this order guessed best among the rules tried (``docs/DRAFT.md``).
"""

from __future__ import annotations

from bisect import bisect_left

# a suffix of this text at least this long proposes before the store does
CONTEXT_FIRST = 2


class SuffixIndex:
    """A growing and shrinking token sequence (``tokens``) with its n-gram and bigram index.

    Args:
        min_n, max_n: shortest / longest suffix indexed (``1 <= min_n <= max_n``; checked by
            the caller).
        store: an ``NGramStore`` consulted when no suffix of ``CONTEXT_FIRST`` tokens or more
            occurred earlier (read only; clones share it).
    """

    def __init__(self, min_n: int, max_n: int, store=None) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.store = store
        self.tokens: list[int] = []
        self.ends: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(min_n, max_n + 1)]
        self.followers: dict[int, dict[int, int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, t: int) -> None:
        """Add token ``t`` at the end: one new end position per indexed n, one bigram count."""
        h = self.tokens
        h.append(t)
        e = len(h) - 1
        for n, d in enumerate(self.ends, self.min_n):
            if n > e + 1:
                break
            key = tuple(h[e - n + 1 :])
            lst = d.get(key)
            if lst is None:
                d[key] = [e]
            else:
                lst.append(e)
        if e:
            f = self.followers.get(h[e - 1])
            if f is None:
                self.followers[h[e - 1]] = {t: 1}
            else:
                f[t] = f.get(t, 0) + 1

    def truncate(self, length: int) -> None:
        """Forget the tokens at and after ``length`` (``0 <= length <= len(self)``)."""
        h = self.tokens
        if length == 0:
            h.clear()
            for d in self.ends:
                d.clear()
            self.followers.clear()
            return
        for e in range(len(h) - 1, length - 1, -1):
            for n, d in enumerate(self.ends, self.min_n):
                if n > e + 1:
                    break
                key = tuple(h[e - n + 1 : e + 1])
                lst = d[key]
                lst.pop()  # e is the largest position stored: positions ascend
                if not lst:
                    del d[key]
            if e:
                f = self.followers[h[e - 1]]
                c = f[h[e]] - 1
                if c:
                    f[h[e]] = c
                else:
                    del f[h[e]]
                    if not f:
                        del self.followers[h[e - 1]]
        del h[length:]

    def propose_at(self, p: int) -> tuple[int, int]:
        """``(token, match_len)`` to follow ``tokens[: p + 1]`` (``match_len`` 0: fallback).

        The longest suffix ending at ``p`` (``max_n`` down to ``min_n``) that also ended
        earlier proposes what followed its most recent earlier occurrence; the store (if any)
        comes before suffixes shorter than ``CONTEXT_FIRST``, its context length then being
        ``match_len``."""
        h = self.tokens
        if not 0 <= p < len(h):
            raise ValueError(f"position {p} outside the history [0, {len(h)})")
        last = len(h) - 1
        lo = self.min_n
        store = self.store
        for n in range(min(self.max_n, p + 1), lo - 1, -1):
            if store is not None and n < CONTEXT_FIRST:
                tok, m = store.lookup(h, p + 1)
                if m:
                    return tok, m
                store = None
            lst = self.ends[n - lo].get(tuple(h[p - n + 1 : p + 1]))
            if lst is None:
                continue
            if p == last:  # the common case: p itself is the largest position stored
                if len(lst) > 1:
                    return h[lst[-2] + 1], n
                continue
            i = bisect_left(lst, p)
            if i:
                return h[lst[i - 1] + 1], n
        if store is not None:
            tok, m = store.lookup(h, p + 1)
            if m:
                return tok, m
        return self._fallback(p), 0

    def _fallback(self, p: int) -> int:
        """The token that most often followed ``tokens[p]`` within ``tokens[: p + 1]`` (ties to
        the smallest id), else ``tokens[p]`` itself."""
        h = self.tokens
        t = h[p]
        f = self.followers.get(t)
        if f and p < len(h) - 1:  # discount pairs after position p
            f = dict(f)
            for i in range(p, len(h) - 1):
                if h[i] == t:
                    f[h[i + 1]] -= 1
            f = {k: v for k, v in f.items() if v}
        if not f:
            return t
        return min(f.items(), key=lambda kv: (-kv[1], kv[0]))[0]
