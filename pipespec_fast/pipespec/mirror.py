"""``Mirror``: stage i's copy of stage i-1's sequence, and what it offers stage i to verify."""

from __future__ import annotations

from pipespec_fast.decoding.span import Row, TokenSpan
from pipespec_fast.pipespec.messages import Chunk


class Mirror:
    """Stage i's copy of stage i-1's sequence, built from i-1's Chunks in order, and the
    length ``agree`` of the prefix on which it agrees with stage i's own sequence (both long
    enough: ``mirror[:agree] == own[:agree]``).

    Drafts are the mirror's tokens past stage i's own length, and only while the mirror agrees
    with all of stage i's sequence: a Chunk made before stage i-1 saw stage i's last Sync
    simply disagrees and offers nothing until i-1's next Chunk.
    """

    def __init__(self, prompt: list[int]) -> None:
        self.span = TokenSpan.known(prompt)
        self.agree = len(prompt)
        self.ready = None  # the event of the latest Chunk that had one (CUDA, ``Chunk.ready``)

    def apply(self, c: Chunk) -> None:
        """Stage i-1's sequence is now ``seq[:c.start] + c.span``."""
        self.span.truncate(c.start)
        self.span.extend(c.span)
        self.agree = min(self.agree, c.start)
        if c.ready is not None:  # recorded after every row so far, on stage i-1's one stream
            self.ready = c.ready

    def own_changed(self, pos: int) -> None:
        """Stage i's own sequence changed from ``pos`` on (it adopted a sync from above)."""
        self.agree = min(self.agree, pos)

    def common_prefix(self, seq: list[int]) -> int:
        """How far the mirror agrees with ``seq`` (stage i's sequence), moving ``agree``."""
        self.agree = self.span.common_prefix(seq, self.agree)
        return self.agree

    def offer(self, seq: list[int], n: int, with_rows: bool
              ) -> tuple[list[int], list[Row] | None, bool]:
        """``(drafts, rows, spoke)`` for a stage holding ``seq``: up to ``n`` usable drafts
        past its end (:meth:`TokenSpan.usable`; ``rows`` under sampling), none unless the
        mirror agrees with all of ``seq``; ``spoke``: stage i-1 has already proposed
        something for the next position (with only guesses when ``drafts`` is empty)."""
        L = len(seq)
        if self.common_prefix(seq) < L:
            return [], None, False
        self.span.forget_rows(L)  # positions stage i holds: their rows are not needed again
        drafts, rows = self.span.usable(L, n, with_rows)
        return drafts, rows, len(self.span) > L
