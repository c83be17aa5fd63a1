"""What the caller receives: text pieces as tokens are verified (incremental detokenisation,
stop strings, the token ids kept when a stop string cuts the text) and where output ends."""

from __future__ import annotations


class Detokenizer:
    """Incremental detokenisation with stop strings; holds back incomplete UTF-8.

    Each call decodes all ids so far (a tokenizer's pieces do not concatenate: spaces and
    multi-byte characters depend on the neighbouring tokens) and returns what is new. Text is
    held back while it ends in an incomplete character (decoded as U+FFFD) or in a prefix of
    a stop string, so the caller never sees text it would have to take back.

    Args:
        tokenizer: a ``transformers`` tokenizer (``None``: no text at all).
        stop: stop strings; the text ends before the first one found.
        incremental: ``False`` decodes once, at :meth:`flush` (no one reads the pieces).
    """

    def __init__(self, tokenizer, stop: list[str] | None, incremental: bool = True) -> None:
        self.tok = tokenizer
        self.incremental = incremental
        self.stop = stop or []
        self.text = ""
        self._cut: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def feed(self, ids: list[int]) -> tuple[str, bool]:
        """``ids``: every new token so far. Returns the new text piece ("" when held back) and
        whether a stop string was found (the text then ends before it)."""
        if self.tok is None or not self.incremental:
            return "", False
        full = self._decode(ids)
        if full.endswith("\ufffd"):
            return "", False
        for s in self.stop:
            j = full.find(s)
            if j >= 0:
                full = full[:j]
                self._cut = j
                piece = full[len(self.text) :]
                self.text = full
                return piece, True
        # hold back a possible prefix of a stop string
        hold = 0
        for s in self.stop:
            for L in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:L]):
                    hold = max(hold, L)
                    break
        visible = full[: len(full) - hold]
        piece = visible[len(self.text) :] if len(visible) > len(self.text) else ""
        self.text = max(self.text, visible, key=len)
        return piece, False

    def flush(self, ids: list[int]) -> str:
        """At the end: the text not returned yet, held-back text included ("" after a
        stop)."""
        if self.tok is None or self._cut is not None:
            return ""
        full = self._decode(ids)
        piece = full[len(self.text) :]
        self.text = full
        return piece

    def kept_ids(self, ids: list[int]) -> list[int]:
        """The longest prefix of ``ids`` whose text lies wholly before the stop cut: a token
        whose text the cut splits (or follows) is not returned. The returned text may then go
        on past their text, up to the cut, with part of that token's text."""
        cut = self._cut or 0
        kept = 0
        for n in range(1, len(ids) + 1):
            if len(self._decode(ids[:n])) > cut:
                break
            kept = n
        return ids[:kept]


class Output:
    """The caller's side of one generation: the new token ids, cut at the first end-of-sequence
    token, at ``max_new_tokens`` or at a stop string (``reason``: ``"eos"``, ``"length"``,
    ``"stop"``), and the text pieces to stream."""

    def __init__(self, detok: Detokenizer, max_new_tokens: int, eos_ids: set[int]) -> None:
        self.detok = detok
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.reason = "length"

    def feed(self, tokens: list[int]) -> str:
        """Take newly verified tokens; returns the text piece they complete ("" if none)."""
        ids = self.ids
        for tok in tokens:
            ids.append(tok)
            if tok in self.eos_ids:
                self.reason = "eos"
                break
            if len(ids) >= self.max_new_tokens:
                break
        piece, hit = self.detok.feed(ids)
        if hit:
            self.reason = "stop"
        return piece

    @property
    def done(self) -> bool:
        return self.reason != "length" or len(self.ids) >= self.max_new_tokens

    def finish(self) -> str:
        """The text not yet returned; cuts ``ids`` to those a stop string keeps."""
        tail = self.detok.flush(self.ids)
        if self.reason == "stop":
            self.ids = self.detok.kept_ids(self.ids)
        return tail
