"""The engine's errors beyond ``ValueError`` (which every argument check raises).

A generation either returns the target's tokens or raises one of these: it never returns
tokens that a misbehaving stage chose."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage failed during generation; ``stage`` names it (``"1 (draft)"``), ``__cause__``
    is the original exception."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"stage {stage} failed: {type(exc).__name__}: {exc}")
        self.stage = stage


class NonFiniteLogitsError(ArithmeticError):
    """A stage's forward produced a NaN or +inf logit, or a row with no finite logit: no token
    can be chosen from it (raised as the ``__cause__`` of a :class:`StageError`)."""


class GenerationTimeout(TimeoutError):
    """The generation ran past its ``timeout_s``."""


class PipelineClosedError(RuntimeError):
    """``close()`` was called while this generation ran (or before it started)."""
