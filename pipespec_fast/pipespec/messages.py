"""The messages between PipeSpec's stage workers, and from the target to the caller.

Every worker has one FIFO inbox (``queue.SimpleQueue``) with one producer per direction, so
messages from one neighbour arrive in the order they were sent. Consistency is checked by
content (a stage compares token ids, it does not trust message order across neighbours), so a
stale message can waste work but never make the output wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipespec_fast.decoding.span import TokenSpan


@dataclass(slots=True)
class Chunk:
    """Stage i-1 -> stage i: "my sequence is now ``seq[:start] + span``" (new drafts with the
    rows they were drawn from, or tokens it adopted from a sync). ``ready``: on CUDA, an
    event recorded on stage i-1's stream after the rows were made; stage i's stream waits for
    it before reading them."""

    start: int
    span: TokenSpan
    ready: object = None


@dataclass(slots=True)
class Sync:
    """Stage i -> stage i-1: "my sequence is ``seq[:start] + tokens``". The lower stage finds
    the first divergence, rolls its KV cache back there, adopts the rest and tells the stage
    above it what changed (a Chunk): rollbacks cascade down the pipeline."""

    start: int
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class Wanted:
    """Stage i -> model stage i-1: whether it takes i-1's drafts now. A stage whose drafts
    are not wanted (the window for them is 0: waiting for them does not pay) only follows
    syncs, leaving the cores to the stages that work; it drafts again once wanted."""

    wanted: bool


PAUSE = Wanted(False)
RESUME = Wanted(True)


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do but look at the stop event now (the pipeline is stopping), instead of at
    the next poll of a blocked inbox."""


WAKE = Wake()


@dataclass(slots=True)
class Emit:
    """Target -> caller: newly verified tokens (``tokens``) or a failure (``error``, raised
    by the stage named ``stage``)."""

    tokens: list[int]
    error: BaseException | None = None
    stage: str | None = None
