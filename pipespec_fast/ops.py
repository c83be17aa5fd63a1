"""One entry per kernel: Triton on CUDA, the torch reference on CPU, with the same contract.

``PIPESPEC_BACKEND=triton|reference`` (``RuntimeConfig.backend``, read from the process
configuration on every call) forces a backend (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is imported). Every entry validates its arguments and
raises ``ValueError`` naming the offending one; contracts are documented in
:mod:`pipespec_fast.reference`.
"""

from __future__ import annotations

import threading

import torch

from pipespec_fast import config, reference, validate


def backend_for(t: torch.Tensor) -> str:
    """The backend that serves tensors on ``t``'s device: ``"triton"`` or ``"reference"``."""
    forced = config.current().backend  # validated when the configuration was read
    if forced == "auto":
        return "triton" if t.is_cuda else "reference"
    return forced


# Triton's interpreter patches module-level state while it runs a kernel, so two threads must
# not interpret at once (PipeSpec stages are threads). Compiled kernels need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _run_triton(kernel, *args, **kwargs):
    if config.current().triton_interpret:
        with _INTERPRETER_LOCK:
            return kernel(*args, **kwargs)
    return kernel(*args, **kwargs)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _check_parents(parents: torch.Tensor, n: int, name: str = "parents") -> None:
    _check(parents.dim() == 1 and parents.shape[0] == n, name, f"expected shape [{n}], got "
           f"{tuple(parents.shape)}")
    _check(parents.dtype in (torch.int32, torch.int64), name, f"must be int32/int64, got "
           f"{parents.dtype}")


def check_tree(parents: torch.Tensor) -> None:
    """Validate a parents array on the host (done once per tree, outside the hot loop)."""
    _check(parents.dim() == 1, "parents", f"must be 1-D, got shape {tuple(parents.shape)}")
    n = parents.shape[0]
    _check(n <= reference.MAX_TREE_NODES, "parents",
           f"at most {reference.MAX_TREE_NODES} nodes, got {n}")
    p = parents.to("cpu", torch.int64)
    idx = torch.arange(n)
    _check(bool(((p >= -1) & (p < idx)).all()), "parents",
           "must be topologically ordered: -1 <= parents[i] < i")


# ----------------------------------------------------------------------------- attention


_VALID_ATTENTION_SIGS: set = set()


def _validate_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits) -> None:
    _check(q.dim() == 3, "q", f"expected [n, n_heads, head_dim], got {tuple(q.shape)}")
    n, n_heads, head_dim = q.shape
    _check(k_cache.dim() == 3, "k_cache",
           f"expected [kv_heads, max_len, head_dim], got {tuple(k_cache.shape)}")
    kv_heads, max_len, _ = k_cache.shape
    _check(v_cache.shape == k_cache.shape, "v_cache",
           f"shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _check(k_cache.shape[2] == head_dim, "k_cache", f"head_dim {k_cache.shape[2]} != q's "
           f"{head_dim}")
    _check(n_heads % kv_heads == 0, "q", f"n_heads {n_heads} not a multiple of kv_heads "
           f"{kv_heads}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _check(tuple(t.shape) == (n, kv_heads, head_dim), name,
               f"expected {(n, kv_heads, head_dim)}, got {tuple(t.shape)}")
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("anc_bits", anc_bits)):
        _check(t.device == q.device, name, f"on {t.device}, q on {q.device}")
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        _check(t.dtype == q.dtype, name, f"dtype {t.dtype} != q's {q.dtype}")
    _check(anc_bits.dtype == torch.int32 and tuple(anc_bits.shape) == (n, (n + 31) // 32),
           "anc_bits", f"expected int32 [{n}, {(n + 31) // 32}], got {anc_bits.dtype} "
           f"{tuple(anc_bits.shape)}")
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), "q",
           f"dtype must be float32/float16/bfloat16, got {q.dtype}")
    _check_cache_len(cache_len, n, max_len, q.device)


def _check_cache_len(cache_len, n: int, max_len: int, device: torch.device) -> None:
    """A host int, or a 0-d int32 tensor on ``device`` (the CUDA-graph form). A tensor's value
    is checked only on the CPU, where reading it is free; on an accelerator the caller
    guarantees ``0 <= cache_len <= max_len - n`` (reading it would synchronise)."""
    if isinstance(cache_len, torch.Tensor):
        _check(cache_len.dim() == 0 and cache_len.dtype == torch.int32, "cache_len",
               f"a tensor must be 0-d int32, got {cache_len.dtype} {tuple(cache_len.shape)}")
        _check(cache_len.device == device, "cache_len", f"on {cache_len.device}, q on {device}")
        if cache_len.device.type != "cpu":
            return
        cache_len = int(cache_len)
    _check(cache_len >= 0, "cache_len", f"must be >= 0, got {cache_len!r}")
    _check(cache_len + n <= max_len, "cache_len",
           f"{cache_len} + {n} new tokens exceeds the cache's max_len {max_len}")


def verify_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float | None = None,
    *,
    aligned: bool = False,
) -> torch.Tensor:
    """See :func:`pipespec_fast.reference.verify_attention`. ``cache_len`` is a host int or a
    0-d int32 tensor on ``q``'s device (the form CUDA-graph capture needs: the Triton kernels
    read it on the device, so neither the launch nor a compiled variant depends on its
    value; docs/KERNELS.md). ``aligned``: batch-invariant mode's row-invariant form
    (:func:`verify_attention_static`)."""
    sig = (q.shape, q.dtype, q.device, k_new.shape, k_new.dtype, k_new.device, v_new.shape,
           v_new.dtype, v_new.device, k_cache.shape, k_cache.dtype, k_cache.device,
           v_cache.shape, v_cache.dtype, v_cache.device, anc_bits.shape, anc_bits.dtype,
           anc_bits.device)
    if sig in _VALID_ATTENTION_SIGS:  # shapes/dtypes/devices already checked: bounds only
        if isinstance(cache_len, torch.Tensor):
            _check_cache_len(cache_len, q.shape[0], k_cache.shape[1], q.device)
        elif not 0 <= cache_len <= k_cache.shape[1] - q.shape[0]:
            _check(False, "cache_len", f"{cache_len} + {q.shape[0]} new tokens exceeds the "
                   f"cache's max_len {k_cache.shape[1]}")
    else:
        _validate_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits)
        if len(_VALID_ATTENTION_SIGS) < 4096:
            _VALID_ATTENTION_SIGS.add(sig)
    if backend_for(q) == "triton":
        return _attention_triton(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale,
                                 aligned)
    if aligned:
        return reference.verify_attention_aligned(q, k_new, v_new, k_cache, v_cache,
                                                  int(cache_len), anc_bits, scale)
    return reference.verify_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits,
                                      scale)


def verify_attention_static(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_len: torch.Tensor, anc_bits: torch.Tensor,
                            n_valid: torch.Tensor, scale: float | None = None,
                            aligned: bool = False) -> torch.Tensor:
    """:func:`verify_attention` on a captured step's block (``decoding/captured.py``): the
    cache length and the number of real rows are 0-d int tensors on ``q``'s device, and the
    rows from ``n_valid`` on are padding (roots of their own, ancestor of no real row).

    The Triton kernel reads the length on the device and computes every row: the mask keeps
    the padding rows out of the real ones. The reference (the CPU) reads both on the host
    (free there) and computes the real rows alone, exactly as an unpadded block, so a padded
    step's real rows are the eager forward's bit for bit: a softmax over more (masked) keys
    can round differently. Its padding rows come out zero and write no cache slot.

    ``aligned`` (batch-invariant mode): a chain row's bits depend on its inputs only, never on where
    the block starts or how long it is. The Triton kernel walks the keys in tiles and splits
    at absolute slots (``kernels.verify_attention``); the reference computes each real row as
    one-token decoding does (:func:`reference.verify_attention_aligned`, trees too)."""
    if backend_for(q) == "triton":
        return verify_attention(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale,
                                aligned=aligned)
    n = int(n_valid)
    _check(0 <= n <= q.shape[0], "n_valid", f"{n} outside [0, {q.shape[0]}]")
    out = q.new_zeros(q.shape)
    out[:n] = verify_attention(q[:n], k_new[:n], v_new[:n], k_cache, v_cache, int(cache_len),
                               anc_bits[:n, : (n + 31) // 32], scale, aligned=aligned)
    return out


def _attention_triton(q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale,
                      aligned):
    from pipespec_fast.kernels.verify_attention import verify_attention as kernel

    return _run_triton(kernel, q, k_new, v_new, k_cache, v_cache, cache_len, anc_bits, scale,
                       aligned=aligned)


# ----------------------------------------------------------------------------- kv cache


def kv_compact(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
               dst_start: int) -> None:
    """See :func:`pipespec_fast.reference.kv_compact` (in place, all layers)."""
    _check(k_cache.dim() == 4, "k_cache",
           f"expected [n_layers, kv_heads, max_len, head_dim], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, "v_cache", "shape differs from k_cache")
    _check(v_cache.dtype == k_cache.dtype, "v_cache", "dtype differs from k_cache")
    _check(src.dim() == 1 and src.dtype in (torch.int32, torch.int64), "src",
           f"expected 1-D int tensor, got {src.dtype} {tuple(src.shape)}")
    _check(src.device == k_cache.device, "src", f"on {src.device}, cache on {k_cache.device}")
    _check(v_cache.device == k_cache.device, "v_cache",
           f"on {v_cache.device}, k_cache on {k_cache.device}")
    m = src.shape[0]
    _check(0 <= dst_start and dst_start + m <= k_cache.shape[2], "dst_start",
           f"{dst_start} + {m} exceeds max_len {k_cache.shape[2]}")
    if m == 0:
        return
    if src.device.type == "cpu":
        # Free on the host (no device sync); the in-order overlap argument of the kernel needs
        # strictly increasing sources at or above their destinations.
        s = src.to(torch.int64)
        ok = bool((s >= dst_start + torch.arange(m)).all()) and bool((s < k_cache.shape[2]).all())
        ok = ok and bool((s[1:] > s[:-1]).all())
        _check(ok, "src", f"must be strictly increasing with dst_start + i <= src[i] < max_len "
               f"{k_cache.shape[2]}, got {s.tolist()}")
    if backend_for(k_cache) == "triton":
        from pipespec_fast.kernels.kv_rollback import kv_compact as kernel

        _run_triton(kernel, k_cache, v_cache, src, dst_start)
        return
    reference.kv_compact(k_cache, v_cache, src, dst_start)


# ----------------------------------------------------------------------------- acceptance


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """See :func:`pipespec_fast.reference.probs_from_logits` (torch on every backend)."""
    validate_sampling(temperature, top_k, top_p)
    return reference.probs_from_logits(logits, temperature, top_k, top_p)


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` naming the first invalid sampling parameter (the rules of
    :mod:`pipespec_fast.validate`, the one validation layer)."""
    validate.temperature(temperature)
    validate.top_k(top_k)
    validate.top_p(top_p)


def _check_accept_common(draft_tokens: torch.Tensor, parents: torch.Tensor) -> None:
    """Shared checks of the acceptance entries (shapes/dtypes always, tree order on the host)."""
    n = draft_tokens.shape[0]
    _check(draft_tokens.dtype in (torch.int32, torch.int64), "draft_tokens",
           f"must be int32/int64, got {draft_tokens.dtype}")
    _check(n <= reference.MAX_TREE_NODES, "draft_tokens",
           f"at most {reference.MAX_TREE_NODES} nodes, got {n}")
    _check_parents(parents, n)
    if parents.device.type == "cpu":
        # Free on the host; on an accelerator call check_tree once when the tree is built.
        check_tree(parents)


def greedy_accept(draft_tokens: torch.Tensor, parents: torch.Tensor, target_ids: torch.Tensor):
    """See :func:`pipespec_fast.reference.greedy_accept`."""
    n = draft_tokens.shape[0]
    _check(draft_tokens.dim() == 1, "draft_tokens", f"must be 1-D, got "
           f"{tuple(draft_tokens.shape)}")
    _check_accept_common(draft_tokens, parents)
    _check(tuple(target_ids.shape) == (n + 1,), "target_ids",
           f"expected [{n + 1}], got {tuple(target_ids.shape)}")
    _check(target_ids.dtype in (torch.int32, torch.int64), "target_ids",
           f"must be int32/int64, got {target_ids.dtype}")
    for name, t in (("parents", parents), ("target_ids", target_ids)):
        _check(t.device == draft_tokens.device, name, "on a different device than draft_tokens")
    if backend_for(draft_tokens) == "triton":
        from pipespec_fast.kernels.acceptance import greedy_accept as kernel

        return _run_triton(kernel, draft_tokens, parents, target_ids)
    return reference.greedy_accept(draft_tokens, parents, target_ids)


def stochastic_accept(draft_tokens: torch.Tensor, parents: torch.Tensor,
                      draft_probs: torch.Tensor, target_probs: torch.Tensor, seed: int,
                      offset: int):
    """See :func:`pipespec_fast.reference.stochastic_accept`."""
    n = draft_tokens.shape[0]
    _check(draft_tokens.dim() == 1, "draft_tokens", f"must be 1-D, got "
           f"{tuple(draft_tokens.shape)}")
    _check_accept_common(draft_tokens, parents)
    for name, x in (("seed", seed), ("offset", offset)):
        _check(hasattr(x, "__index__") and not isinstance(x, (bool, torch.Tensor)), name,
               f"must be an int, got {x!r}")
    _check(draft_probs.dim() == 2 and draft_probs.shape[0] == n, "draft_probs",
           f"expected [{n}, V], got {tuple(draft_probs.shape)}")
    V = draft_probs.shape[1]
    _check(tuple(target_probs.shape) == (n + 1, V), "target_probs",
           f"expected [{n + 1}, {V}], got {tuple(target_probs.shape)}")
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        _check(t.dtype == torch.float32, name, f"must be float32, got {t.dtype}")
        _check(t.device == draft_tokens.device, name, "on a different device than draft_tokens")
    if backend_for(draft_tokens) == "triton":
        from pipespec_fast.kernels.acceptance import stochastic_accept as kernel

        return _run_triton(kernel, draft_tokens, parents, draft_probs, target_probs, seed, offset)
    race = _c_race(target_probs)
    if race is None:
        return reference.stochastic_accept(draft_tokens, parents, draft_probs, target_probs,
                                           seed, offset)
    return reference.stochastic_accept(
        draft_tokens, parents, draft_probs, target_probs, seed, offset,
        residual_race=lambda r, s, o: race.race_argmax(r, race.key(s, o,
                                                                   reference.STREAM_RESIDUAL)),
        accept_uniforms=race.uniforms(max(n, 1), race.key(seed, offset,
                                                          reference.STREAM_ACCEPT)))


def sample_from_probs(probs: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """See :func:`pipespec_fast.reference.sample_from_probs`: the C race for fp32 CPU rows
    (:mod:`pipespec_fast.cpu.race`: the same uniforms), torch otherwise."""
    _check(probs.dim() == 2, "probs", f"expected [m, V], got {tuple(probs.shape)}")
    race = _c_race(probs)
    if race is None:
        return reference.sample_from_probs(probs, seed, offset)
    m, V = probs.shape
    key = race.key(seed, offset, reference.STREAM_DRAFT)
    return torch.tensor([race.race_argmax(probs[i], key, i * V) for i in range(m)],
                        dtype=torch.int64)


def _c_race(t: torch.Tensor):
    """:mod:`pipespec_fast.cpu.race` for fp32 CPU tensors when the C library is loaded (and
    ``PIPESPEC_C_KERNELS`` allows it), else ``None``."""
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return None
    from pipespec_fast.cpu import race

    return race if race.available() else None
