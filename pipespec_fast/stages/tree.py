"""``DraftTree``: a token tree a drafter proposes, in the layout the tree kernels take.

The verification attention, ``kv_compact`` and the acceptance kernels describe a block of
drafts by ``parents``: node ``i``'s parent index, ``-1`` for a child of the last verified
token, topologically ordered (``parents[i] < i``; ``reference`` module doc). A chain is the
special case ``parents = [-1, 0, ..., n-2]``. The acceptance kernels try the children of a node
in index order, so a drafter lists siblings most likely first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """``tokens[i]`` proposed after the path to ``parents[i]`` (``-1``: after the last verified
    token); ``weights[i]``: the drafter's estimate of the probability of the path to node
    ``i`` (for a model-free drafter: the share of its observed continuations through it)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.parents) != n or len(self.weights) != n:
            raise ValueError(f"DraftTree: {n} tokens, {len(self.parents)} parents, "
                             f"{len(self.weights)} weights")
        bad = [i for i, p in enumerate(self.parents) if not -1 <= p < i]
        if bad:
            raise ValueError(f"DraftTree: parents must be topological (-1 <= parents[i] < i), "
                             f"not at nodes {bad[:5]}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        """Every node the only child of the one before it."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node (children of the last verified token: 0)."""
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def prefix(self, m: int) -> DraftTree:
        """The first ``m`` nodes: a tree too, parents coming first (a drafter lists its nodes
        best first, so a prefix is its best smaller tree)."""
        if m >= len(self.tokens):
            return self
        return DraftTree(self.tokens[:m], self.parents[:m], self.weights[:m])

    def path_tokens(self, path: list[int]) -> list[int]:
        """The tokens of the nodes ``path`` (an accepted path, root first)."""
        return [self.tokens[i] for i in path]

    def parents_tensor(self, device: torch.device | str = "cpu", offset: int = 0
                       ) -> torch.Tensor:
        """``parents`` as an int64 tensor with every index shifted by ``offset``: the tree fed
        after ``offset`` chain tokens (its roots then hang below the last of them, ``offset -
        1``; ``offset = 0`` keeps the roots at ``-1``)."""
        if offset == 0:
            return torch.tensor(self.parents, dtype=torch.int64, device=device)
        return torch.tensor([p + offset for p in self.parents], dtype=torch.int64, device=device)

    def one_hot_rows(self, vocab_size: int, device: torch.device | str = "cpu",
                     ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, V]`` fp32: each node's draft distribution when the drafter is deterministic
        (a point mass at its token). These are the rows an n-gram chain gets from its
        ``0 / -inf`` logits under any temperature / top-k / top-p; with them recursive
        rejection sampling over siblings accepts child ``x`` with probability ``r(x) /
        sum(r)`` and removes ``x`` from the residual on rejection: sampling without
        replacement from the verifier's distribution, hence lossless. ``ids``: the tokens
        already on ``device`` (uploaded without blocking, ``StageDevice.upload``)."""
        n = len(self.tokens)
        rows = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
        if n:
            if ids is None:
                ids = torch.tensor(self.tokens, dtype=torch.int64, device=device)
            rows[torch.arange(n, device=device), ids] = 1.0
        return rows
