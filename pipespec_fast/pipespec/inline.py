"""Inline drafters: a lowest stage run inside the worker above it instead of in a thread.

A model-free stage (the n-gram drafter) proposes in microseconds, so a thread of its own would
only take the interpreter lock from the model stage above it. The verifier drives it on demand
through :class:`InlineDrafter`, the whole interface between the two, and reads its proposals
from the drafter's :class:`~pipespec_fast.pipespec.mirror.Mirror`, which the drafter keeps an
exact copy of its sequence.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.decoding.tree_step import draft_tree
from pipespec_fast.pipespec.messages import Chunk, Sync
from pipespec_fast.pipespec.mirror import Mirror
from pipespec_fast.stages.ngram_tree import EMPTY
from pipespec_fast.stages.tree import DraftTree


@runtime_checkable
class InlineDrafter(Protocol):
    """What a verifier asks of a drafter it runs inline.

    ``mirror`` is the verifier's copy of the drafter's sequence; the drafter updates it itself
    whenever its sequence changes, with ``agree`` measured against the verifier's sequence.
    """

    mirror: Mirror

    def start(self, prompt: list[int]) -> None:
        """Reset to ``prompt`` (and make a fresh ``mirror``)."""

    def sync(self, msg: Sync) -> None:
        """Adopt the verifier's sequence ``seq[:msg.start] + msg.tokens`` (a Sync)."""

    def fill(self, upper_seq: list[int], want: int) -> None:
        """Draft until ``want`` tokens ahead of ``upper_seq`` (the verifier's sequence), when
        the drafter agrees with all of it; nothing otherwise."""

    def tree(self, upper_seq: list[int], budget: int, depth: int, decay: float = 1.0
             ) -> DraftTree:
        """A token tree of at most ``budget`` nodes and ``depth`` levels after ``upper_seq``
        (``decay``: the verifier's per-level acceptance), when the drafter's sequence is
        exactly ``upper_seq``; empty otherwise."""


class InlineStage:
    """:class:`InlineDrafter` over a stage's :class:`Sequencer`.

    Failures are re-raised as they are, with ``pipespec_stage`` naming this stage (not the
    worker that ran it) for the caller's ``StageError``.
    """

    def __init__(self, seqr: Sequencer) -> None:
        self.s = seqr
        self.mirror = Mirror([])

    def _named(self, e: BaseException) -> BaseException:
        e.pipespec_stage = self.s.label
        return e

    def start(self, prompt: list[int]) -> None:
        self.mirror = Mirror(prompt)
        try:
            self.s.start(prompt)
        except Exception as e:
            raise self._named(e)  # noqa: B904 (re-raised as is, with the stage named)

    def sync(self, msg: Sync) -> None:
        try:
            changed = self.s.apply_sync(msg.start, msg.tokens)
        except Exception as e:
            raise self._named(e)  # noqa: B904
        if changed is not None:
            self.mirror.apply(Chunk(changed, TokenSpan(self.s.seq[changed:])))

    def fill(self, upper_seq: list[int], want: int) -> None:
        try:
            self._fill(upper_seq, want)
        except Exception as e:
            raise self._named(e)  # noqa: B904

    def tree(self, upper_seq: list[int], budget: int, depth: int, decay: float = 1.0
             ) -> DraftTree:
        s, up = self.s, len(upper_seq)
        if len(s.seq) != up or self.mirror.common_prefix(upper_seq) < up:
            return EMPTY
        try:
            return draft_tree(s, budget, depth, decay)
        except Exception as e:
            raise self._named(e)  # noqa: B904

    def _fill(self, upper_seq: list[int], want: int) -> None:
        s, up = self.s, len(upper_seq)
        if len(s.seq) < up or self.mirror.common_prefix(upper_seq) < up:
            return
        lead = len(s.seq) - up
        if lead < want:
            start = len(s.seq)
            s.draft(want - lead)
            self.mirror.apply(Chunk(start, s.span[start:]))
