"""The kernels as torch custom ops (namespace ``pipespec``), with fake (meta) implementations.

Importing this module registers::

    torch.ops.pipespec.verify_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits,
                                        scale=None) -> Tensor        # mutates k_cache, v_cache
    torch.ops.pipespec.verify_attention.cache_tensor(q, k_new, v_new, k_cache, v_cache,
                                                     cache_len, anc_bits, scale=None) -> Tensor
        # the same with cache_len a 0-d int32 tensor on q's device (CUDA-graph capture: the
        # kernels read it on the device). Eager calls to torch.ops.pipespec.verify_attention
        # pick this overload for a tensor by themselves; code traced by torch.compile must
        # name it (dynamo tries the int overload first and fails on the tensor).
    torch.ops.pipespec.verify_attention_static(q, k_new, v_new, k_cache, v_cache, cache_len,
                                               anc_bits, n_valid, scale=None,
                                               aligned=False) -> Tensor
        # the same on a captured step's padded block: cache_len and n_valid 0-d int tensors;
        # aligned: batch-invariant mode's row-invariant form
    torch.ops.pipespec.linear(x, w) -> Tensor   # x @ w.T as the model computes it on CPU
    torch.ops.pipespec.kv_compact(k_cache, v_cache, src, dst_start) -> ()  # mutates both caches
    torch.ops.pipespec.greedy_accept(draft_tokens, parents, target_ids) -> (Tensor, Tensor, Tensor)
    torch.ops.pipespec.stochastic_accept(draft_tokens, parents, draft_probs, target_probs, seed,
                                         offset) -> (Tensor, Tensor, Tensor)

Each real implementation calls the :mod:`pipespec_fast.ops` entry (validation, then Triton on
CUDA or the torch reference on CPU), so the contracts are those of
:mod:`pipespec_fast.reference`. The fake implementations only compute output shapes, which
depend on input shapes alone, so ``torch.compile`` can trace through the ops (as opaque calls
with declared mutations) without data-dependent guards.
"""

from __future__ import annotations

import torch

from pipespec_fast import ops

_NS = "pipespec"


@torch.library.custom_op(f"{_NS}::verify_attention", mutates_args=("k_cache", "v_cache"))
def verify_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int,
    anc_bits: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    out = ops.verify_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale)
    return out.contiguous()


def _attention_out(q: torch.Tensor) -> torch.Tensor:
    """Every attention op's fake: an output shaped like ``q: [n, n_heads, head_dim]``."""
    torch._check(q.dim() == 3, lambda: "q: expected [n, n_heads, head_dim]")
    return q.new_empty(q.shape)


@verify_attention.register_fake
def _verify_attention_fake(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale=None):
    return _attention_out(q)


@torch.library.custom_op(f"{_NS}::verify_attention.cache_tensor",
                         mutates_args=("k_cache", "v_cache"))
def verify_attention_cache_tensor(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    out = ops.verify_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale)
    return out.contiguous()


@verify_attention_cache_tensor.register_fake
def _verify_attention_cache_tensor_fake(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits,
                                        scale=None):
    return _attention_out(q)


@torch.library.custom_op(f"{_NS}::verify_attention_static",
                         mutates_args=("k_cache", "v_cache"))
def verify_attention_static(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    anc_bits: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    aligned: bool = False,
) -> torch.Tensor:
    """:func:`pipespec_fast.ops.verify_attention_static`: the length and the real rows as
    device tensors, so a captured step's shapes and arguments are the same at every length
    and block size of its bucket (``decoding/captured.py``); ``aligned``: batch-invariant mode's."""
    out = ops.verify_attention_static(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits,
                                      n_valid, scale, aligned)
    return out.contiguous()


@verify_attention_static.register_fake
def _verify_attention_static_fake(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits,
                                  n_valid, scale=None, aligned=False):
    return _attention_out(q)


@torch.library.custom_op(f"{_NS}::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` by :func:`pipespec_fast.cpu.linear.linear`: on CPU fp32 the batch-invariant
    C GEMM (a ctypes call, which ``torch.compile`` could not trace), elsewhere ``F.linear``."""
    from pipespec_fast.cpu.linear import linear as cpu_linear

    return cpu_linear(x, w).contiguous()


@linear.register_fake
def _linear_fake(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op(f"{_NS}::kv_compact", mutates_args=("k_cache", "v_cache"))
def kv_compact(
    k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst_start: int
) -> None:
    ops.kv_compact(k_cache, v_cache, src, dst_start)


@kv_compact.register_fake
def _kv_compact_fake(k_cache, v_cache, src, dst_start):
    return None


def _accept_outputs(draft_tokens: torch.Tensor):
    n = draft_tokens.shape[0]
    return (
        draft_tokens.new_empty((n,), dtype=torch.int64),
        draft_tokens.new_empty((), dtype=torch.int64),
        draft_tokens.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op(f"{_NS}::greedy_accept", mutates_args=())
def greedy_accept(
    draft_tokens: torch.Tensor, parents: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.greedy_accept(draft_tokens, parents, target_ids)


@greedy_accept.register_fake
def _greedy_accept_fake(draft_tokens, parents, target_ids):
    return _accept_outputs(draft_tokens)


@torch.library.custom_op(f"{_NS}::stochastic_accept", mutates_args=())
def stochastic_accept(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.stochastic_accept(draft_tokens, parents, draft_probs, target_probs, seed, offset)


@stochastic_accept.register_fake
def _stochastic_accept_fake(draft_tokens, parents, draft_probs, target_probs, seed, offset):
    return _accept_outputs(draft_tokens)
