"""The ``Stage`` protocol: what a model must offer to sit in a pipeline.

A stage owns a model and its KV cache. Its contract, for a block of ``n`` new tokens:

* ``forward(tokens, parents=None, last_n=None)`` runs them as a chain (or a tree given by
  ``parents``) after the ``cache_len`` cached tokens, appends their K/V (node ``i`` at slot
  ``cache_len + i``) and returns fp32 logits ``[last_n or n, vocab_size]``;
* ``rollback(length)`` forgets cached tokens at and after ``length``;
* ``keep_path(start, path, num, chain)`` keeps tree nodes ``path[:num]`` contiguously from slot
  ``start`` (see :meth:`KVCache.keep_path`);
* ``capabilities``: a :class:`StageCapabilities` declaring everything else the engine may ask
  of the stage. A plain model stage declares ``StageCapabilities()``.

Other runtimes plug in by implementing this protocol (see :class:`~pipespec_fast.stages.HFStage`
for a ``transformers`` model); :func:`check_stage` is what ``FastPipeline`` checks at
construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class StageCapabilities:
    """What a stage declares beyond the core protocol; the engine reads nothing else.

    Attributes:
        model_free: proposals cost next to nothing (no model: the n-gram drafter). The stage
            gets no thread and no cores: the worker above runs it inline and it fills its
            whole lead at once instead of drafting one token per step. Such a stage may also
            offer ``propose(tokens) -> int``: the token of ``forward(tokens, last_n=1)``'s
            row, which must be one-hot (0 there, ``-inf`` elsewhere), without building it:
            drafting then takes it (and, sampling, the one-hot probability row a draw from
            that row gives).
        confidence: the stage marks weak proposals. After each ``forward`` it exposes
            ``last_match_len`` and ``min_confident_match``; the last row's proposal is a guess,
            never sent for verification, when ``last_match_len < min_confident_match``.
        clone: ``clone()`` returns a fresh stage with the same settings and an empty cache
            (the target of a deeper hierarchy then runs a second copy of a model-free lowest
            stage on its own sequence: skip-level drafts).
        trees: ``forward`` accepts ``parents`` and ``keep_path(..., chain=False)`` keeps tree
            paths: the stage can verify a tree of drafts (``FastPipeline(tree_budget=...)``
            checks it of the stage above a tree drafter).
        tree_drafts: ``propose_tree(budget, max_depth, decay)`` returns a
            :class:`~pipespec_fast.stages.tree.DraftTree` continuing the stage's whole
            history (its ``cache_len`` tokens), nodes best first (``decay``: the verifier's
            per-level acceptance): a drafter of token trees (the n-gram drafter; a
            ``LlamaStage``, in sync mode). Checked when a pipeline uses trees
            (``tree_budget > 0``), not at every construction.
        eos_token_ids: the model's end-of-sequence ids: the target's are the default of
            ``FastPipeline(eos_token_ids=...)`` (with the tokenizer's).
        num_params: the model's parameter count (``None``: not declared). A pipeline checks
            that model stages do not shrink towards the target: a hierarchy given in the wrong
            order would silently decode with a draft as the target.
    """

    model_free: bool = False
    confidence: bool = False
    clone: bool = False
    trees: bool = False
    tree_drafts: bool = False
    eos_token_ids: tuple[int, ...] = ()
    num_params: int | None = None


@runtime_checkable
class Stage(Protocol):
    name: str
    vocab_size: int
    max_len: int
    capabilities: StageCapabilities

    @property
    def cache_len(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def forward(
        self, tokens: torch.Tensor, parents: torch.Tensor | None = None, last_n: int | None = None
    ) -> torch.Tensor: ...

    def rollback(self, length: int) -> None: ...

    def keep_path(self, start: int, path: torch.Tensor, num: int, chain: bool = False) -> None: ...


_MEMBERS = ("name", "vocab_size", "max_len", "capabilities", "cache_len", "device", "forward",
            "rollback", "keep_path")
# what each capability obliges the stage to offer as well (``tree_drafts``' ``propose_tree``:
# checked only where trees are used, ``check_tree_drafter``: a wrapper that forwards a
# ``LlamaStage``'s capabilities without it keeps working with chains)
_NEEDS = {"confidence": ("last_match_len", "min_confident_match"), "clone": ("clone",)}


def check_stage(stage: object, index: int) -> None:
    """Raise a one-line ``ValueError`` naming ``stages[index]`` and what it lacks: a member of
    the protocol, a ``StageCapabilities``, or what a declared capability needs."""
    missing = [m for m in _MEMBERS if not hasattr(stage, m)]
    caps = getattr(stage, "capabilities", None)
    if caps is not None and not isinstance(caps, StageCapabilities):
        missing.append(f"capabilities as a StageCapabilities (got {type(caps).__name__})")
    elif caps is not None:
        missing += [f"{m} (declares {cap}=True)" for cap, members in _NEEDS.items()
                    if getattr(caps, cap) for m in members if not hasattr(stage, m)]
    if missing:
        name = getattr(stage, "name", None) or type(stage).__name__
        raise ValueError(f"stages[{index}] {name!r} does not implement the Stage protocol "
                         f"(pipespec_fast.stages.Stage): missing {', '.join(missing)}")


def check_tree_drafter(stage: object, index: int) -> None:
    """Raise a one-line ``ValueError`` unless ``stages[index]`` declares ``tree_drafts`` and
    offers ``propose_tree`` (a pipeline with ``tree_budget > 0`` asks it for trees)."""
    name = getattr(stage, "name", None) or type(stage).__name__
    if not stage.capabilities.tree_drafts:
        raise ValueError(f"stages[{index}] {name!r} does not draft trees "
                         "(capabilities.tree_drafts: the n-gram drafter, a LlamaStage)")
    if not hasattr(stage, "propose_tree"):
        raise ValueError(f"stages[{index}] {name!r} does not implement the Stage protocol "
                         "(pipespec_fast.stages.Stage): missing propose_tree (declares "
                         "tree_drafts=True)")


def check_order(stages: list[Stage]) -> None:
    """Model stages smallest first: a declared parameter count must not decrease towards the
    target (``FastPipeline(check_order=False)`` skips this for unusual hierarchies)."""
    sized = [(i, st) for i, st in enumerate(stages)
             if not st.capabilities.model_free and st.capabilities.num_params is not None]
    for (i, lo), (j, hi) in zip(sized, sized[1:], strict=False):
        if lo.capabilities.num_params > hi.capabilities.num_params:
            raise ValueError(
                f"stages: stage {i} {lo.name!r} ({lo.capabilities.num_params:,} parameters) is "
                f"larger than stage {j} {hi.name!r} ({hi.capabilities.num_params:,}): stages go "
                "smallest first, target last (check_order=False to allow it)")


def is_model_free(stage: Stage) -> bool:
    """A stage whose proposals cost next to nothing (``capabilities.model_free``)."""
    return stage.capabilities.model_free
