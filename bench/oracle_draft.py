"""``OracleDraft``: a draft stage whose greedy acceptance rate is set, not learned.

Why: a benchmark of the modes needs a draft with a draft's *cost* (a real SmolLM2-shaped
forward) and a chosen acceptance rate ``a`` (issue 13's goal is stated at 0.7), without a
checkpoint. Random weights give the cost but no agreement with the target, and a noisy copy of
the target has the target's shape, not a draft's. The oracle keeps the real forward for its
cost and replaces its logits by a one-hot row: at position ``p`` the proposed token is, with
probability ``a``, the target's own greedy token there (read from a reference run of the target
alone, ``ar`` mode, on the same prompt) and otherwise another token. Which positions are right
is a deterministic hash of ``(p, seed)``, so reruns and modes agree.

The stage adds no host synchronisation: the token of each position is looked up in a table
uploaded to the device once, at construction, and sliced with host integers (the cache length
before the forward), then written into the real logits in place (zero them, scatter one value),
queued on the stream that produced them, after the forward. Greedy decoding only (the one-hot
rows are not a distribution worth sampling from); the target verifies, so the output stays the
target's whatever the oracle proposes.
"""

from __future__ import annotations

import torch

from pipespec_fast.stages.base import StageCapabilities

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit integer mixer (splitmix64's finaliser): consecutive inputs give independent-
    looking outputs, the same on every machine and Python version (unlike ``hash``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def is_right(position: int, acceptance: float, seed: int) -> bool:
    """Whether the oracle proposes the reference token at ``position``: a uniform draw in
    [0, 1) from ``(position, seed)``, below ``acceptance``."""
    return _mix(position ^ (seed << 40)) / 2**64 < acceptance


def oracle_tokens(reference: list[int], acceptance: float, vocab_size: int, length: int,
                  seed: int) -> list[int]:
    """The token proposed at each position ``0 .. length - 1``: ``reference[p]`` where
    :func:`is_right`, else a different token (also past the reference's end, where nothing is
    known: there the proposal is a hashed token, right only by chance)."""
    out = []
    for p in range(length):
        h = _mix(p ^ (seed << 40) ^ (1 << 63))
        if p < len(reference) and is_right(p, acceptance, seed):
            out.append(reference[p])
        else:
            base = reference[p] if p < len(reference) else 0
            out.append((base + 1 + h % (vocab_size - 1)) % vocab_size)
    return out


class OracleDraft:
    """A stage (``pipespec_fast.stages.Stage``) running ``inner``'s forward for its cost and
    proposing :func:`oracle_tokens` of ``reference`` (the prompt followed by the target's
    greedy tokens). Chains only (``trees=False``); cache and rollback are ``inner``'s."""

    def __init__(self, inner, reference: list[int], acceptance: float, seed: int = 0,
                 name: str | None = None) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance!r}")
        self.inner = inner
        self.acceptance = acceptance
        self.seed = seed
        self.name = name or f"oracle-{inner.name}"
        self.vocab_size = inner.vocab_size
        self.max_len = inner.max_len
        # row i of a forward predicts position cache_len + i + 1 <= max_len: max_len + 1 entries
        table = oracle_tokens(reference, acceptance, self.vocab_size, self.max_len + 1, seed)
        self.table = torch.tensor(table, dtype=torch.int64).to(inner.device)  # once, here

    @property
    def capabilities(self) -> StageCapabilities:
        caps = self.inner.capabilities
        return StageCapabilities(eos_token_ids=caps.eos_token_ids, num_params=caps.num_params)

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                last_n: int | None = None) -> torch.Tensor:
        if parents is not None:
            raise ValueError(f"{self.name}: an oracle draft runs chains only (trees=False)")
        start = self.inner.cache_len  # a host int: known before the forward
        logits = self.inner.forward(tokens, last_n=last_n)
        rows = logits.shape[0]
        first = start + tokens.shape[0] - rows + 1  # the position the first row predicts
        picks = self.table[first:first + rows].unsqueeze(1)
        with torch.inference_mode():  # the model's logits are inference tensors
            return logits.zero_().scatter_(1, picks, 1.0)

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def keep_path(self, start: int, path: torch.Tensor, num: int, chain: bool = False) -> None:
        self.inner.keep_path(start, path, num, chain)
