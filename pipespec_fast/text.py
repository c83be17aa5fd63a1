"""Detokenisation for the caller: text pieces as tokens are verified, stop strings, and the
token ids kept when a stop string cuts the text."""

from __future__ import annotations


class Detokenizer:
    """Incremental detokenisation with stop strings; holds back incomplete UTF-8."""

    def __init__(self, tokenizer, stop: list[str] | None, incremental: bool = True) -> None:
        self.tok = tokenizer
        self.incremental = incremental
        self.stop = stop or []
        self.text = ""
        self._cut: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def feed(self, ids: list[int]) -> tuple[str, bool]:
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
        if self.tok is None or self._cut is not None:
            return ""
        full = self._decode(ids)
        piece = full[len(self.text) :]
        self.text = full
        return piece

    def kept_ids(self, ids: list[int]) -> list[int]:
        """The shortest prefix of ``ids`` whose text reaches the stop cut."""
        for n in range(len(ids) + 1):
            if len(self._decode(ids[:n])) >= (self._cut or 0):
                return ids[:n]
        return ids
