"""How a stage turns logits into tokens: the generation's ``SamplingParams`` (greedy or
sampled) and each stage's ``StageSampler`` (its random stream, its draws, its acceptance op)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipespec_fast import ops, reference, validate
from pipespec_fast.cpu import race
from pipespec_fast.cpu import sample as csample
from pipespec_fast.errors import NonFiniteLogitsError

NON_FINITE = ("non-finite logits (NaN or +inf, or a row without a finite value): no token can "
              "be chosen")
# The row of a token a deterministic (model-free) drafter proposed: a point mass at that token.
# Kept as this empty marker instead of a [V] one-hot row (building, stacking and reading those
# took ~0.1-0.15 ms a sampled verify step); the acceptance treats it as the one-hot row, in C
# without ever building it (``cpu/sample.py``, ``q=None``). Never modified.
POINT_MASS = torch.empty(0)


def is_point_mass(row: torch.Tensor | None) -> bool:
    """Whether a draft's row is :data:`POINT_MASS` (any empty row, so that a copy counts)."""
    return row is not None and row.numel() == 0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters, validated on construction (``ValueError`` names the argument).

    ``temperature == 0`` is greedy decoding; otherwise tokens are drawn from the
    temperature / top-k / top-p distribution with counter-based randomness from ``seed``
    (``None``: a fresh seed per generation), so a seeded generation is reproducible.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        validate.temperature(self.temperature)
        validate.top_k(self.top_k)
        validate.top_p(self.top_p)
        validate.seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[n, V]`` -> ``[n, V]`` probabilities of the distribution sampled."""
        return ops.probs_from_logits(logits, self.temperature, self.top_k, self.top_p)


def _read_pair(x: torch.Tensor, tok: torch.Tensor) -> tuple[float, int]:
    """Two 0-d tensors to the host in one read (one synchronisation on CUDA; on CPU two
    cheap item reads, no stacking)."""
    if x.device.type == "cpu":
        return x.item(), int(tok)
    xf, tf = torch.stack([x.double(), tok.double()]).tolist()
    return xf, int(tf)


def _seed_for(seed: int | None, index: int) -> int:
    base = seed if seed is not None else int(torch.randint(0, 2**31, ()))
    return (base * 1000003 + index * 7919) & 0x7FFFFFFF


def max_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.max(-1)`` of ``[n, V]`` rows: the greedy choice and the value that checks it
    is finite. On CPU fp32 in C (``cpu/race.py``; with AVX-512 ~2-3 us a row against torch's
    25-100 for a 49k vocabulary in a pipeline, paid on every decoding and verify step), else
    torch's; the same values and indices (the first of equal maxima)."""
    if _rows_on_host(logits):
        return race.rows_max(logits)
    return logits.max(-1)


def _rows_on_host(logits: torch.Tensor) -> bool:
    """Whether ``logits`` ``[n, V]`` are rows :func:`max_rows` reads in C (fp32 CPU, unit
    stride)."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.dim() == 2 and logits.stride(-1) == 1 and race.available())


class StageSampler:
    """One stage's token choices: its own draws and its acceptance of the drafts below.

    Each stage has its own counter-based random stream (a seed from the generation's seed and
    the stage's index, an offset advanced per draw or acceptance step), so a draft is drawn
    with fresh randomness once the prefix it extends is fixed, and a seeded generation
    repeats its draws exactly.
    """

    def __init__(self, params: SamplingParams, index: int) -> None:
        self.params = params
        self.seed = _seed_for(params.seed, index)
        self.rng_offset = 0

    def _next_offset(self) -> int:
        self.rng_offset += 1
        return self.rng_offset

    def draw(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The next token from ``logits`` ``[1, V]``, and the ``[V]`` row it was drawn from
        (``None`` when greedy: the argmax)."""
        if self.params.greedy:
            best, tok = max_rows(logits[:1])  # the argmax and the value that checks it
            best_f, tok_i = _read_pair(best[0], tok[0])
            if not math.isfinite(best_f):
                raise NonFiniteLogitsError(NON_FINITE)
            return tok_i, None
        if self._sampled_on_host(logits):  # C: the same uniforms, fewer passes (cpu/sample.py)
            tok_i, row = self._draw_on_host(logits)
            if tok_i < 0:
                raise NonFiniteLogitsError(NON_FINITE)
            return tok_i, row
        tok, row, finite = self.draw_on_device(logits)
        ok, tok_i = _read_pair(finite, tok[0])  # a NaN row samples some index: refused here
        if not ok:
            raise NonFiniteLogitsError(NON_FINITE)
        return tok_i, row

    def draw_on_device(self, logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`draw` without reading anything on the host: ``(token, row, finite)``, the
        token ``[1]`` int64 (the next forward's input as it is), the row as :meth:`draw`'s
        and ``finite`` a 0-d bool (``False``: no token can be chosen; the caller reads it
        with the token, once per run of draws, and refuses the run)."""
        if self.params.greedy:
            best, tok = max_rows(logits[:1])
            return tok, None, torch.isfinite(best[0])
        if self._sampled_on_host(logits):  # draw()'s draw: a run draws what one by one does
            tok_i, row = self._draw_on_host(logits)
            return torch.tensor([max(tok_i, 0)]), row, torch.tensor(tok_i >= 0)
        finite = torch.isfinite(logits.amax(-1)).all()
        p = self.params.probs(logits)
        tok = ops.sample_from_probs(p, self.seed, self._next_offset())
        return tok.view(1).long(), p[0], finite

    def accept(self, drafts: torch.Tensor, logits: torch.Tensor, q: torch.Tensor | None,
               on_host: bool = False) -> tuple[Any, Any, Any, torch.Tensor | None]:
        """The acceptance op on a chain of ``drafts`` ``[n]`` given the verifier's ``logits``
        ``[n + 1, V]``; ``q`` ``[n, V]`` (sampling, ``n > 0``): the rows the drafts were drawn
        from, or :data:`POINT_MASS` when every draft is a point mass. Returns
        ``(num_accepted, next_token, finite)`` as device tensors (``finite``: 0-d bool, every
        row has a finite maximum: read with the step's one host sync, and the
        step's outcome is refused when it is false) and the verifier's ``[n + 1, V]``
        probabilities (``None`` when greedy). ``on_host`` (the caller reads results on the host
        at once: not a deferred-read device): on CPU rows the outcome is computed in C and the
        three come as host values ``int, int, bool`` (:meth:`_greedy_chain_on_host`,
        :meth:`_sampled_chain_on_host`)."""
        if on_host and self.params.greedy and _rows_on_host(logits):
            return self._greedy_chain_on_host(drafts, logits)
        n = drafts.shape[0]
        if on_host and n and self._sampled_on_host(logits) and (
                is_point_mass(q) or _rows_on_host(q)):
            return self._sampled_chain_on_host(drafts, logits, None if is_point_mass(q) else q)
        if is_point_mass(q):  # the torch path: the one-hot rows themselves
            q = torch.nn.functional.one_hot(drafts, logits.shape[-1]).to(torch.float32)
        parents = reference.chain_parents(n, drafts.device)
        _, num, nxt, finite, p = self.accept_tree(drafts, parents, logits, q)
        return num, nxt, finite, p

    @staticmethod
    def _greedy_chain_on_host(drafts: torch.Tensor, logits: torch.Tensor
                              ) -> tuple[int, int, bool, None]:
        """:meth:`accept` for a greedy chain on CPU, as plain host values: the verifier's
        argmax per row in C (:func:`max_rows`), then the acceptance op's rule for a chain on
        the host (each draft is accepted while it equals the argmax before it; the next token
        is the argmax after the last accepted). The same outcome as ``ops.greedy_accept``
        without its checks and tensors: in a pipeline, right after a forward that streamed
        the weights through the caches, those cost ~0.15 ms a verify step."""
        best, ids = race.rows_max(logits)
        want, got = ids.tolist(), drafts.tolist()
        num = 0
        while num < len(got) and got[num] == want[num]:
            num += 1
        return num, want[num], all(map(math.isfinite, best.tolist())), None

    def _sampled_on_host(self, logits: torch.Tensor) -> bool:
        """Whether sampling from ``logits`` runs in C (:mod:`pipespec_fast.cpu.sample`):
        fp32 CPU rows, no top-k / top-p, the C library's AVX-512F path."""
        pr = self.params
        return (not pr.greedy and pr.top_k is None and pr.top_p is None
                and _rows_on_host(logits) and csample.fast())

    def _draw_on_host(self, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A draw from row 0 in C (the token -1 when it has no finite maximum) and its row."""
        return csample.draw(logits[:1], self.params.temperature, self.seed, self._next_offset())

    def _sampled_chain_on_host(self, drafts: torch.Tensor, logits: torch.Tensor,
                               q: torch.Tensor | None) -> tuple[int, int, bool, torch.Tensor]:
        """:meth:`accept` under sampling on CPU, in C (``cpu/sample.py``: the acceptance op's
        rule and uniforms on the tempered softmax, computed only for the rows it visits), as
        host values; the returned rows past ``num_accepted`` are not filled. ``q`` ``None``:
        point masses."""
        out = csample.accept_chain(logits, self.params.temperature, drafts.tolist(), q,
                                   self.seed, self._next_offset())
        if out is None:
            return 0, 0, False, None
        num, nxt, p = out
        return num, nxt, True, p

    def accept_tree(self, drafts: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor,
                    q: torch.Tensor | None, on_host: bool = False) -> tuple[torch.Tensor, ...]:
        """:meth:`accept` on a tree of ``drafts`` (``parents`` ``[n]``, topological; logits row
        ``i + 1`` follows node ``i``). Returns ``(path, num_accepted, next_token, finite, p)``:
        ``path`` ``[n]`` the accepted nodes in order (padded with -1), the rest as
        :meth:`accept` (tensors; ``on_host``: CPU rows are decided in C / on the host, and
        under sampling only ``p``'s rows 0 and ``c + 1`` of each accepted ``c`` are filled)."""
        n = drafts.shape[0]
        if self.params.greedy:
            best, target_ids = max_rows(logits)
            accept = (reference.greedy_accept if on_host and _rows_on_host(logits)
                      else ops.greedy_accept)  # on the host: the tree was checked when built
            path, num, nxt = accept(drafts, parents, target_ids)
            return path, num, nxt, torch.isfinite(best).all(), None
        point = is_point_mass(q)
        if on_host and n and self._sampled_on_host(logits) and (point or _rows_on_host(q)):
            out = csample.accept_tree(logits, self.params.temperature, drafts.tolist(),
                                      parents.tolist(), None if point else q, self.seed,
                                      self._next_offset())
            if out is None:
                return torch.full((n,), -1), torch.tensor(0), torch.tensor(0), \
                    torch.tensor(False), None
            path, num, nxt, p = out
            return path, torch.tensor(num), torch.tensor(nxt), torch.tensor(True), p
        if point:  # the torch path: the one-hot rows themselves
            q = torch.nn.functional.one_hot(drafts, logits.shape[-1]).to(torch.float32)
        finite = torch.isfinite(logits.amax(-1)).all()
        p = self.params.probs(logits)
        path, num, nxt = ops.stochastic_accept(drafts, parents, q if n else p[:0], p, self.seed,
                                               self._next_offset())
        return path, num, nxt, finite, p
