"""Warm-up at load: rehearse on a stage every kind of step a generation will run, so that no
kernel is compiled mid-generation.

Why: Triton compiles a kernel variant the first time it is launched with a new combination of
constexprs and argument specialisations, which takes a second or more and stalls the whole
pipeline; cuBLAS and the caching allocator likewise do their first-use work then. The
variants a generation needs do not depend on the cache length or the block size themselves
(``do_not_specialize``, docs/KERNELS.md) but do on:

* attention split or not: an eager step with a host-int cache length of at most
  ``MIN_SPLIT_KEYS`` runs unsplit, a longer one split (partials + combine);
* chain or tree, and the acceptance kernels' node block (16, 32 or 64 nodes);
* greedy or sampled acceptance (the vocabulary-chunked passes);
* whether a slice of the block's ids starts 16-byte aligned (Triton specialises pointers on
  it): the verifier's uncached tokens before the drafts are one or two.

So the rehearsal prefills a dummy prompt longer than ``MIN_SPLIT_KEYS`` (when the cache has
room for it), drafts, verifies chains of 1, 17 and 33 drafts and (a tree verifier) trees of 3,
17 and 33 nodes, each greedy and sampled, after one and two uncached tokens, and finally
empties the cache. Its outputs are
discarded: it runs on dummy tokens, so it touches nothing a generation reads.

``FastPipeline`` runs it once per CUDA stage when it is built (``warm_up=None``); on the CPU
nothing is compiled at run time and it is skipped unless asked for (tests).
"""

from __future__ import annotations

import time

import torch

from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.tree_step import verify_tree
from pipespec_fast.stages.tree import DraftTree

SPLIT_KEYS = 256  # the kernels' MIN_SPLIT_KEYS (tested equal): longer prefixes run split
BLOCKS = (1, 17, 33)  # one block of each acceptance node-block size (16, 32, 64)

# ids of the stages warmed up (any object can be a stage: no weak reference, no hash needed;
# an id reused by a later stage only skips a warm-up, which costs time, never a token)
_warmed: set[int] = set()


def should_warm_up(stage, requested: bool | None) -> bool:
    """Whether to warm ``stage`` up: ``requested`` when given, else a CUDA stage with a model
    (model-free stages launch no kernels) not warmed up before."""
    if requested is not None:
        return requested
    caps = stage.capabilities
    return stage.device.type == "cuda" and not caps.model_free and id(stage) not in _warmed


def _tree(n: int) -> DraftTree:
    """A tree of ``n`` nodes with two roots and branching below them (not a chain)."""
    parents = tuple([-1, -1] + [i // 2 for i in range(n - 2)])[:n]
    return DraftTree(tokens=tuple(1 + i % 7 for i in range(n)), parents=parents,
                     weights=tuple(1.0 / (1 + i) for i in range(n)))


def _room(n: int) -> int:
    """Cache slots a verify of ``n`` drafts (or a tree of ``max(n, 3)`` nodes) may take after
    the drafted sequence: the block, two uncached tokens, and a captured step's padding to the
    next power of two."""
    return 2 * max(n, 3) + 4


def _rehearse(stage, params: SamplingParams, prompt: list[int], blocks: tuple[int, ...]
              ) -> None:
    s = Sequencer(stage, params, index=0, adaptive=False, keep_rows=False)
    s.start(prompt)
    s.draft(2)
    base = len(s.seq)
    V, dev = stage.vocab_size, stage.device
    uniform = None if params.greedy else torch.full((V,), 1.0 / V, device=dev)

    def back() -> None:  # to the drafted sequence, its last token uncached (as after a step)
        s.truncate(base)
        stage.rollback(min(stage.cache_len, base - 1))

    for n in blocks:
        for extra in (0, 1):  # one or two uncached tokens before the drafts
            back()
            s.span.extend_known([1] * extra)
            s.verify([2] * n, None if uniform is None else [uniform] * n)
            if stage.capabilities.trees:
                m = max(n, 3)
                back()
                s.span.extend_known([1] * extra)
                verify_tree(s, _tree(m), None if uniform is None else uniform.expand(m, V))
    if stage.capabilities.trees:  # a branch accepted (above, chance decides): kv_compact
        back()
        stage.keep_path(stage.cache_len - 2, torch.ones(1, dtype=torch.int64, device=dev), 1)
    stage.rollback(0)


def warm_up(stage) -> float:
    """Rehearse a generation's steps on ``stage`` (module doc) and leave its cache empty;
    returns the seconds it took. The stage must be idle (no generation running on it). A
    cache too short for the long prompt or the large blocks rehearses what it can hold: a
    generation on it cannot reach the rest either."""
    t = time.perf_counter()
    blocks = tuple(n for n in BLOCKS if 4 + 2 + _room(n) <= stage.max_len)
    if blocks:
        length = min(SPLIT_KEYS + 16, stage.max_len - 2 - _room(blocks[-1]))
        prompt = [1 + i % 5 for i in range(length)]
        with torch.inference_mode():
            for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
                _rehearse(stage, params, prompt, blocks)
    if stage.device.type == "cuda":  # nothing of the rehearsal left queued
        torch.cuda.synchronize(stage.device)
    _warmed.add(id(stage))
    return time.perf_counter() - t
