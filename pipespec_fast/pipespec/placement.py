"""The distributed placement: one process (rank) per model stage, over ``torch.distributed``.

Rank ``r`` of a group of ``K`` ranks runs model stage ``r`` of the hierarchy (counting model
stages only; the last rank is the target). A model-free lowest stage (the n-gram drafter) has
no rank: rank 0 runs it inline, as a thread-placed stage 1 would (``inline.py``), and the
target's rank runs its own copy for skip-level drafts. Every rank reads only its own model's
folder (its weights and its tokenizer, whose digests the ranks compare: ``rank_files.py``).

What every rank must know of the others (names for error messages, the smallest context, the
target's vocabulary and end-of-sequence ids, each stage's device) is gathered once, when the
pipeline is built; so is each link's row route (``payload.py``: NCCL between two GPUs).

Each link (ranks ``l`` and ``l + 1``) carries its messages on a gloo group of its own, made
by every rank in link order when the pipeline is built. Why not one group for all links:
when a receive times out, gloo closes every connection of the group it belongs to. With one
group, the neighbour of a hung rank would close its links to *every* rank, and a rank two
links away would see its own (healthy) neighbour's connection closed and blame it, while the
hung rank went unnamed. With a group per link, a timeout closes that link only: the rank
that timed out names the hung one, and its ``Fail`` reaches the others over links that still
work. The whole-world gloo group (``group``) serves the collectives only (start-up, the
handshake of each generation).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipespec_fast import config
from pipespec_fast.pipespec.payload import PayloadLink, describe, make_routes
from pipespec_fast.pipespec.rank_files import rank_tokenizer, together
from pipespec_fast.stages import is_model_free

# a neighbour silent this long (heartbeats included) is declared dead: the default of
# PIPESPEC_DIST_PEER_TIMEOUT (docs/CONFIGURATION.md says when to raise it)
PEER_TIMEOUT_S = config.RuntimeConfig().dist_peer_timeout
HEARTBEAT_S = 0.5  # an idle link sends a heartbeat this often
START_TIMEOUT_S = 120.0  # every rank must start a generation within this of the first


@dataclass(frozen=True)
class Placement:
    """Where this process sits in a distributed pipeline.

    ``labels``: every stage's label (``"1 (draft)"``), the model-free lowest one included;
    ``inline_lowest``: global stage 0 is model-free (run inline on rank 0, and copied on the
    target's rank for skip-level drafts); ``rows``: each link's row route (link ``l``: ranks
    ``l`` and ``l + 1``; ``None`` for the links of other ranks), empty for rows with the
    control messages everywhere; ``links``: each link's control group (``None`` for the
    links of other ranks; empty: every link on ``group``).
    """

    rank: int
    world: int
    group: object
    labels: tuple[str, ...]
    inline_lowest: bool
    max_len: int  # the smallest context of every stage
    target_vocab: int
    target_eos: tuple[int, ...]
    peer_timeout_s: float = PEER_TIMEOUT_S
    heartbeat_s: float = HEARTBEAT_S
    start_timeout_s: float = START_TIMEOUT_S
    rows: tuple[PayloadLink | None, ...] = ()
    links: tuple[object | None, ...] = ()

    @property
    def k(self) -> int:
        """Stages in the whole pipeline."""
        return len(self.labels)

    @property
    def stage(self) -> int:
        """This rank's model stage (its global index)."""
        return self.rank + int(self.inline_lowest)

    @property
    def is_target(self) -> bool:
        return self.rank == self.world - 1

    def indices(self, stages: list) -> list[int]:
        """The global index of each of this rank's ``stages`` (a model-free one is stage 0)."""
        return [0 if is_model_free(st) else self.stage for st in stages]

    def chain(self) -> str:
        """Every stage and where it runs, for people: ``ngram (inline) -> m0 on rank 0 ->
        m1 on rank 1`` (the labels number stages, which are not ranks)."""
        names = [label.split(" (", 1)[1][:-1] for label in self.labels]
        where = [f"{n} on rank {i - int(self.inline_lowest)}" for i, n in enumerate(names)]
        if self.inline_lowest:
            where[0] = f"{names[0]} (inline)"
        return " -> ".join(where)

    def label_of_rank(self, r: int) -> str:
        return f"{self.labels[r + int(self.inline_lowest)]} on rank {r}"

    def link_group(self, peer: int):
        """The control group of the link to neighbour ``peer``."""
        return self.links[min(self.rank, peer)] if self.links else self.group

    def rows_link(self, peer: int) -> PayloadLink | None:
        """The row route of the link to neighbour ``peer`` (``None``: with the rest)."""
        return self.rows[min(self.rank, peer)] if self.rows else None

    @property
    def routes(self) -> tuple[str | None, ...]:
        """Each link's route name (``inline``, ``split``, ``nccl``; ``None``: not ours)."""
        return tuple(None if r is None else r.route for r in self.rows)


def _group_state() -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("distributed: initialise a process group first (torch.distributed."
                         "init_process_group, e.g. under torchrun)")
    return dist.get_rank(), dist.get_world_size()


def make_placement(stages: list, ngram: bool, tokenizer_vocab_size: int | None = None,
                   **timeouts) -> Placement:
    """The placement of this rank's ``stages`` (its model last; an n-gram drafter first on
    rank 0 and on the target's rank when ``ngram``), gathered from every rank (a collective:
    every rank calls it). ``timeouts``: ``Placement``'s; the peer timeout defaults to the
    process configuration's (``PIPESPEC_DIST_PEER_TIMEOUT``)."""
    rank, world = _group_state()
    timeouts.setdefault("peer_timeout_s", config.current().dist_peer_timeout)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=START_TIMEOUT_S))
    links = link_groups(rank, world)
    own = stages[-1]
    eos = list(own.capabilities.eos_token_ids)
    device = _indexed(own.device)
    where = describe(device, config.current().dist_rows)
    info = [None] * world
    dist.all_gather_object(info, (own.name, own.vocab_size, own.max_len, eos, where),
                           group=group)
    names = [i[0] for i in info]
    target_vocab = info[-1][1]
    for name, vocab, *_ in info[:-1]:
        if vocab != target_vocab:
            raise ValueError(f"vocab mismatch: stage {name!r} has vocab_size {vocab}, target "
                             f"{names[-1]!r} has {target_vocab}")
    if ngram:
        names.insert(0, stages[0].name)
    labels = tuple(f"{i} ({n})" for i, n in enumerate(names))
    max_len = min(i[2] for i in info)
    rows = make_routes(rank, world, links, [i[4] for i in info], device, START_TIMEOUT_S)
    return Placement(rank, world, group, labels, ngram, max_len, target_vocab,
                     tuple(info[-1][3]), **timeouts, rows=rows, links=links)


def link_groups(rank: int, world: int) -> tuple[object | None, ...]:
    """Each link's own gloo group (link ``l``: ranks ``l`` and ``l + 1``), ``None`` for the
    links this rank is not on. A collective: every rank makes every group, in link order."""
    out = []
    for low in range(world - 1):
        g = dist.new_group(ranks=[low, low + 1], backend="gloo",
                           timeout=timedelta(seconds=START_TIMEOUT_S))
        out.append(g if rank in (low, low + 1) else None)
    return tuple(out)


def _indexed(device) -> torch.device:
    """``device`` with its index (``cuda`` is the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def rank_device(device):
    """This rank's device for ``device``: an unindexed ``cuda`` is the rank's own GPU, the
    ``i``-th of its host for the ``i``-th rank there (as ``torchrun`` numbers local ranks),
    so that one command line puts each stage on its own GPU (modulo the GPUs there). A
    collective (the hosts' names are gathered)."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if device is None or torch.device(device).type != "cuda" or torch.device(device).index \
            is not None:
        return device
    rank = dist.get_rank()
    local = sum(1 for h in hosts[:rank] if h == hosts[rank])
    return torch.device("cuda", local % torch.cuda.device_count())


def load_local_stages(paths: Sequence[str | Path], device, dtype, max_len: int, ngram: bool,
                      compute: str | None, ngram_store=None):
    """This rank's stages (``paths[rank]``'s model, with an n-gram drafter on rank 0 and on
    the target's rank when ``ngram``), the shared tokenizer, and the placement. Only
    ``paths[rank]`` is read (``rank_files.py``: a host needs only its ranks' folders); a
    rank failing to read or load it ends every rank naming it.

    Compute modes follow ``models.packed.default_modes`` across ranks: a draft holding packed
    weights follows an int8 target (the target's mode is gathered). ``ngram_store``: the
    n-gram drafter's (``loading.load_store``: a folder or a store), read on the ranks with a
    drafter, before any model."""
    from pipespec_fast.loading import load_store
    from pipespec_fast.models.feature_head import is_feature_head
    from pipespec_fast.models.packed import (
        default_compute,
        draft_compute,
        release_freed_memory,
        requantize_fp16,
        set_compute,
    )
    from pipespec_fast.stages import LlamaStage

    rank, world = _group_state()
    if ngram_store is not None and not ngram:  # every rank: the same arguments, the same error
        raise ValueError("ngram_store: only the n-gram drafter uses it (pass ngram=True)")
    if len(paths) != world:
        raise ValueError(f"distributed: {len(paths)} models for {world} ranks (one rank per "
                         "model, the target last)")
    heads = [p for p in paths if is_feature_head(p)]
    if heads:  # every rank: the same arguments, the same error
        raise ValueError(f"paths: {heads[0]} is a feature head: it reads its target's features "
                         "in the target's process (distributed=False)")
    tok = rank_tokenizer(paths, rank)
    device = rank_device(device)
    path = paths[rank]
    # the n-gram drafter's store: read only on the ranks that run a drafter (0 and the
    # target's), each failure reported on every rank
    drafts = ngram and rank in (0, world - 1)
    target_dir = path if rank == world - 1 else None  # rank 0 checks by its tokenizer alone
    store = together("loading the n-gram store", lambda: load_store(
        ngram_store, target_dir, ngram, tok) if drafts else None)
    stage = together("loading its model", lambda: LlamaStage.from_pretrained(
        path, dtype=dtype, device=device, max_len=max_len, name=Path(path).name))
    modes = [None] * world
    dist.all_gather_object(modes, compute or default_compute(stage.model))
    mode = compute or (draft_compute(stage.model, modes[-1]) if rank < world - 1
                       else modes[-1])
    if mode == "int8" and rank < world - 1:
        requantize_fp16(stage.model)  # a draft: as FastPipeline.from_pretrained does
    set_compute(stage.model, mode)
    release_freed_memory()
    stages = together("adding the n-gram drafter",
                      lambda: with_drafter(stage, rank, world, ngram, store))
    return stages, tok, make_placement(stages, ngram)


def with_drafter(stage, rank: int, world: int, ngram: bool, store=None) -> list:
    """This rank's stages: its model ``stage``, with the n-gram drafter below it on rank 0
    (which runs it inline) and on the target's rank (its copy for skip-level drafts), when
    ``ngram``. The drafter stays on the CPU whatever the rank's device, as in one process
    (``loading.load_stages``): its work is host-side lookups, and on a GPU its proposals
    would cost uploads and host reads (three syncs per token) for nothing. ``store``: the
    drafter's ``NGramStore`` (``loading.load_store``)."""
    from pipespec_fast.stages import NGramStage

    if not ngram or rank not in (0, world - 1):
        return [stage]
    return [NGramStage(stage.vocab_size, max_len=stage.max_len, device="cpu", store=store),
            stage]
