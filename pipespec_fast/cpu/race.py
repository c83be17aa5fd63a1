"""Sampling a token by an exponential race in C (``csrc/race.c``).

Why: :mod:`pipespec_fast.reference` draws a token as ``argmax_v w[v] / -log(U_v)`` with
counter-based uniforms (the same numbers on every backend and in every run), computed as five
passes of 64-bit tensor arithmetic over the vocabulary: ~0.6 ms per draw for 49k tokens, as
much as the default draft's whole forward, paid for every sampled draft and every verification.
The C race computes the very same uniforms (bit for bit) and ``-log`` to a few ulp in one
pass (~20 us): the winner equals the reference's except where two ratios agree to their last
bits (``tests/test_cpu_race.py`` checks thousands of draws), and the distribution is the
same. :mod:`pipespec_fast.ops` uses it for CPU tensors when the C library is loaded.
"""

from __future__ import annotations

import torch

from pipespec_fast.cpu import library

_M32 = 0xFFFFFFFF


def available() -> bool:
    """Whether the C race can run here (the library built and not disabled)."""
    return library.load() is not None


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def key(seed: int, offset: int, stream: int) -> int:
    """The 32-bit key of ``reference.rng_key`` in plain integers (no tensors: it is taken
    once per draw)."""
    k = _fmix32((seed & _M32) ^ 0x9E3779B9)
    k = _fmix32(k ^ (offset & _M32))
    return _fmix32(k ^ ((stream * 0x27D4EB2F) & _M32))


def uniforms(n: int, key_: int, index0: int = 0) -> torch.Tensor:
    """``[n]`` fp32: ``reference.counter_uniform`` for counters ``index0 ..`` under
    ``key_`` (the same bits; ``ops.stochastic_accept``'s accept tests on CPU)."""
    out = torch.empty(n, dtype=torch.float32)
    library.load().race_uniforms(out.data_ptr(), n, key_ & _M32, index0)
    return out


def race_argmax(w: torch.Tensor, key_: int, index0: int = 0) -> int:
    """``argmax_v w[v] / -log(U(key_, index0 + v))`` for ``w: [V]`` fp32 on CPU (>= 0,
    finite); the first of equal maxima."""
    if w.dtype != torch.float32 or w.dim() != 1 or w.device.type != "cpu":
        raise ValueError(f"race_argmax: w must be [V] fp32 on CPU, got {w.dtype} "
                         f"{tuple(w.shape)} on {w.device}")
    w = w.contiguous()
    return int(library.load().race_argmax(w.data_ptr(), w.shape[0], key_ & _M32, index0))


def rows_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of ``x: [n, V]`` fp32 on CPU along its last dimension, as
    ``x.max(-1)`` gives them (the first of equal maxima; a row with a NaN: NaN and the first
    NaN's index), in one C pass per row plus one to find the index: the greedy choice of a
    verify step. With AVX-512 ~10x faster than torch's single-threaded reduction on a 49k
    vocabulary; the portable loop (no AVX-512) is about as fast as torch's."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.stride(-1) != 1:
        raise ValueError(f"rows_max: x must be [n, V] fp32 on CPU with unit stride, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    n, v = x.shape
    val = torch.empty(n, dtype=torch.float32)
    idx = torch.empty(n, dtype=torch.int64)
    if n:
        library.load().rows_max(x.data_ptr(), n, v, x.stride(0), val.data_ptr(), idx.data_ptr())
    return val, idx

