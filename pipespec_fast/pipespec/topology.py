"""Who feeds whom in a PipeSpec run: one worker per model stage in a chain, the role of each,
a model-free lowest stage run inline by the stage above it, and skip-level drafts.

Stage i-1's Chunks go to stage i's inbox and stage i's Syncs to stage i-1's; the lowest model
stage drafts, the stages between verify-or-draft, the last one is the target
(``pipespec_fast.pipespec.roles``).

A model-free lowest stage (the n-gram drafter) gets no thread: the stage above runs it inline
(``pipespec_fast.pipespec.inline``), since there is nothing to overlap. In a hierarchy of two
or more model stages over it (``[n-gram -> draft -> target]``), the target also
runs a second copy of it (``clone()``) on its own sequence: skip-level drafts, verified when
the model stage below has nothing usable ready or is not worth waiting for.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.pipespec.inline import InlineStage
from pipespec_fast.pipespec.roles import DrafterWorker, MiddleWorker, TargetWorker
from pipespec_fast.pipespec.worker import StageWorker
from pipespec_fast.stages import is_model_free


@dataclass(frozen=True)
class PipeSpecSettings:
    """The pipeline's settings a PipeSpec run needs (``FastPipeline``'s, per stage)."""

    windows: tuple[int, ...]  # most drafts stage i > 0 verifies in one forward
    max_leads: tuple[int, ...]  # how far stage i < k-1 may run ahead of the stage above
    threads: tuple[int | None, ...]  # torch threads of each stage's worker (None: the current)
    skip_level_drafts: bool = True
    tree_budget: int = 0  # > 0: the inline (n-gram) drafters propose trees of this many nodes


def build(seqrs: list[Sequencer], settings: PipeSpecSettings, limit: int,
          matmul_threads: list[int | None], idle: list[bool] | None,
          stop: threading.Event, out: queue.SimpleQueue) -> list[StageWorker]:
    """The workers to run for ``seqrs`` (one per stage, target last), wired together; the
    target stops once it holds ``limit`` tokens. ``matmul_threads`` / ``idle``: per stage,
    our kernels' threads and idle priority (``threads.CpuThreads``)."""
    k = len(seqrs)
    lowest = seqrs[0]
    inline = is_model_free(lowest.stage)
    workers = [worker_for(seqrs[i], k, settings, limit, matmul_threads[i],
                          bool(idle and idle[i]), stop, out)
               for i in range(1 if inline else 0, k)]
    for lo, hi in zip(workers, workers[1:], strict=False):
        lo.above, hi.below = hi, lo
        # on CPU the stage below starts paused, its prefill deferred: the stage above resumes
        # it once its window wants drafts (after its own prefill, which then has the cores
        # the two would share); on a GPU the two prefills overlap on their own streams
        if torch.device(lo.s.stage.device).type == "cpu":
            lo.wanted, hi._below_wanted, lo.defer_prefill = False, False, True
    if inline:
        workers[0].inline = InlineStage(lowest)
        caps = lowest.stage.capabilities
        if settings.skip_level_drafts and len(workers) > 1 and caps.clone:
            workers[-1].skip = skip_copy(lowest)
        if settings.tree_budget and caps.tree_drafts:  # to each verifier running it inline
            for w in (workers[0], workers[-1]):
                if w.s.stage.capabilities.trees and (w.inline or getattr(w, "skip", None)):
                    w.tree_budget = settings.tree_budget
    return workers


def worker_for(seqr: Sequencer, k: int, settings: PipeSpecSettings, limit: int,
               matmul_threads: int | None, idle: bool, stop: threading.Event,
               out: queue.SimpleQueue) -> StageWorker:
    """The worker of stage ``seqr.index`` of ``k``, in its role (not yet wired)."""
    i = seqr.index
    args = (seqr, i, settings.max_leads[i], stop, out)
    kw = {"threads": settings.threads[i] or torch.get_num_threads(),
          "matmul_threads": matmul_threads, "idle": idle}
    if i == k - 1:
        return TargetWorker(*args, window=settings.windows[i], limit=limit, **kw)
    if i > 0:
        return MiddleWorker(*args, window=settings.windows[i], **kw)
    return DrafterWorker(*args, **kw)


def skip_copy(lowest: Sequencer) -> InlineStage:
    """A second copy of a model-free lowest stage, for the target's skip-level drafts."""
    copy = Sequencer(lowest.stage.clone(), lowest.params, lowest.index, lowest.t0,
                     adaptive=lowest.policy.adaptive, reproducible=False)
    return InlineStage(copy)
