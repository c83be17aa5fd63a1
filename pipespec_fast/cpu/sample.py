"""Sampled decoding from logits on CPU in C (``csrc/sample.c``): the tempered softmax, one
token's draw and speculative sampling over a chain or a tree of drafts.

Why: the torch statements of :mod:`pipespec_fast.reference` (``probs_from_logits``,
``sample_from_probs``, ``stochastic_accept``) take a dozen vocabulary-wide tensor operations and
~40 small ones per sampled verify step; in a pipeline, right after a forward that streamed the
weights through the caches, that was ~0.37 ms per verify of one or two drafts against
~0.16-0.18 ms for a draw alone. The C versions read each row a few times (its maximum, its
exponentials, their normalisation) and compute only the rows the acceptance visits, with the
same counter-based uniforms; their probabilities differ from torch's softmax by float rounding
(``tests/test_cpu_sample.py``). Top-k / top-p sampling keeps the torch path, and so does a CPU
without AVX-512F (:func:`fast`: the portable C path is exact but slower than torch).
:class:`~pipespec_fast.decoding.sampling.StageSampler` uses these for fp32 CPU logits when the
C library is loaded.
"""

from __future__ import annotations

import torch

from pipespec_fast import reference
from pipespec_fast.cpu import library, race


def available() -> bool:
    """Whether the C library is loaded (built and not disabled)."""
    return library.load() is not None


def fast() -> bool:
    """Whether the C library is loaded and runs its AVX-512F path (where the engine uses it)."""
    lib = library.load()
    return lib is not None and bool(lib.sample_fast())


def set_avx512(on: bool) -> bool:
    """Allow or forbid the AVX-512F path (both give the same bits; for tests); returns whether
    it is in use now."""
    return bool(library.load().sample_set_avx512(int(on)))


def _rows(x: torch.Tensor, what: str) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{what}: expected [n, V] fp32 rows on CPU with unit stride, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")


def softmax(x: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """``softmax(x / temperature)`` of one ``[V]`` fp32 CPU row, or ``None`` when the row has no
    finite maximum."""
    if x.dim() != 1:
        raise ValueError(f"softmax: expected one [V] row, got shape {tuple(x.shape)}")
    x = x.contiguous()
    _rows(x.view(1, -1), "softmax")
    p = torch.empty_like(x)
    ok = library.load().sample_softmax(x.data_ptr(), x.shape[0], 1.0 / temperature,
                                       p.data_ptr())
    return p if ok else None


def draw(logits: torch.Tensor, temperature: float, seed: int, offset: int
         ) -> tuple[int, torch.Tensor]:
    """A token from row 0 of ``logits`` ``[1, V]`` (``reference.sample_from_probs`` of its
    tempered softmax: stream ``STREAM_DRAFT``, counters from 0) and the ``[V]`` distribution it
    was drawn from; the token is -1 when the row has no finite maximum."""
    _rows(logits, "draw")
    V = logits.shape[1]
    p = torch.empty(V, dtype=torch.float32)
    tok = library.load().sample_row(logits.data_ptr(), V, 1.0 / temperature,
                                    race.key(seed, offset, reference.STREAM_DRAFT), 0,
                                    p.data_ptr())
    return int(tok), p


def accept_chain(logits: torch.Tensor, temperature: float, drafts: list[int],
                 q: torch.Tensor | None, seed: int, offset: int
                 ) -> tuple[int, int, torch.Tensor] | None:
    """Speculative sampling over a chain (``reference.stochastic_accept`` with chain parents on
    the tempered softmax of ``logits``).

    Args:
        logits: ``[n + 1, V]`` fp32 verifier logits: row ``i`` after the chain's first ``i``
            drafts.
        drafts: the ``n`` draft tokens.
        q: ``[n, V]`` fp32, row ``i`` the distribution ``drafts[i]`` was drawn from; ``None``:
            every draft a point mass (a deterministic drafter: the same outcome as one-hot
            rows, without building or reading them).
        seed, offset: the acceptance step's key (streams ``STREAM_ACCEPT``, ``STREAM_RESIDUAL``).

    Returns ``(num_accepted, next_token, p)`` with ``p`` ``[n + 1, V]`` the verifier's
    distributions, rows ``0 .. num_accepted`` filled (the others are not computed); ``None``
    when a row of ``logits`` has no finite maximum."""
    _check_drafts("accept_chain", logits, drafts, q)
    out = _accept(logits, temperature, drafts, list(range(-1, len(drafts) - 1)), q, seed, offset)
    return None if out is None else out[1:]


def accept_tree(logits: torch.Tensor, temperature: float, tokens: list[int], parents: list[int],
                q: torch.Tensor | None, seed: int, offset: int
                ) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
    """:func:`accept_chain` over a tree (``reference.stochastic_accept``): node ``c`` has token
    ``tokens[c]`` and parent ``parents[c]`` (-1: the root; ``-1 <= parents[c] < c``), row
    ``c + 1`` of ``logits`` follows it, row ``c`` of ``q`` is what it was drawn from (``None``:
    point masses, as :func:`accept_chain`). Returns
    ``(path, num_accepted, next_token, p)``: ``path`` ``[n]`` int64 the accepted nodes in order
    then -1, ``p`` rows 0 and ``c + 1`` of each accepted ``c`` filled; ``None`` when a row of
    ``logits`` has no finite maximum."""
    _check_drafts("accept_tree", logits, tokens, q)
    n = len(tokens)
    if len(parents) != n or any(not -1 <= parents[c] < c for c in range(n)):
        raise ValueError(f"accept_tree: parents must give -1 <= parents[c] < c for each of the "
                         f"{n} nodes, got {parents}")
    return _accept(logits, temperature, tokens, parents, q, seed, offset)


def _accept(logits: torch.Tensor, temperature: float, tokens: list[int], parents: list[int],
            q: torch.Tensor | None, seed: int, offset: int
            ) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
    """``sample_accept_tree`` on checked arguments (:func:`accept_tree`'s result)."""
    n, V = len(tokens), logits.shape[1]
    ids = torch.tensor(tokens + parents, dtype=torch.int64)
    p = torch.empty((n + 1, V), dtype=torch.float32)
    work = torch.empty(V, dtype=torch.float32)
    path = torch.empty(n, dtype=torch.int64)
    nxt = torch.zeros(1, dtype=torch.int64)
    num = library.load().sample_accept_tree(
        logits.data_ptr(), n, V, logits.stride(0), 1.0 / temperature, ids.data_ptr(),
        ids.data_ptr() + 8 * n, q.data_ptr() if n and q is not None else 0,
        q.stride(0) if n and q is not None else 0,
        race.key(seed, offset, reference.STREAM_ACCEPT),
        race.key(seed, offset, reference.STREAM_RESIDUAL), p.data_ptr(), work.data_ptr(),
        path.data_ptr(), nxt.data_ptr())
    return None if _failed(num) else (path, int(num), int(nxt), p)


def _failed(code: int) -> bool:
    """A C acceptance's return code: ``True`` for a row without a finite maximum (-1); -2 (bad
    sizes, refused by the argument checks before) is a bug here."""
    if code == -2:
        raise RuntimeError("sample.c refused the sizes it was given (n > 256 or V <= 0)")
    return code < 0


def _check_drafts(what: str, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None
                  ) -> None:
    """``ValueError`` naming the argument unless ``logits`` has ``len(drafts) + 1`` rows, ``q``
    (unless ``None``) ``len(drafts)`` of the same width and every draft is a token."""
    _rows(logits, f"{what}: logits")
    n, V = len(drafts), logits.shape[1]
    if logits.shape[0] != n + 1:
        raise ValueError(f"{what}: logits has {logits.shape[0]} rows for {n} drafts")
    if n and q is not None:
        _rows(q, f"{what}: q")
        if tuple(q.shape) != (n, V):
            raise ValueError(f"{what}: q expected [{n}, {V}], got {tuple(q.shape)}")
    if not all(0 <= t < V for t in drafts):
        raise ValueError(f"{what}: draft tokens outside [0, {V}): {drafts}")
    if n > reference.MAX_TREE_NODES:
        raise ValueError(f"{what}: at most {reference.MAX_TREE_NODES} drafts, got {n}")
