"""Captured steps: a model stage's decode and verify forwards with static shapes, replayed as
CUDA graphs on CUDA and run eagerly on the CPU (the same code, so CPU tests cover its logic).

Why: an eager forward launches about 35 kernels per layer from Python, some 1,100 for an
8B-shaped model, and the host needs longer to enqueue them than the GPU needs to run a small
draft (issue 13). A CUDA graph replays the whole forward with one launch.

What makes a forward capturable (:func:`static_step`):

* **static shapes**: a block of ``n`` new tokens runs in the smallest bucket ``B >= n`` (powers
  of two up to ``max_n``, 64 by default: every verify block the windows allow). The ``B - n``
  padding rows are roots of their own (ancestor bits: themselves only), so no real row attends
  to them, and their K/V land in slots past the ones the step keeps (the cache's length moves
  by ``n``; unwritten slots are never read, ``kv_cache.py``). Row ``i`` of a real token is the
  eager unpadded forward's, bit for bit, wherever the matmuls are batch invariant (CPU, tested);
* **the cache length as a 0-d device tensor**, and the number of real rows as another
  (``torch.ops.pipespec.verify_attention_static``): positions and the attention's prefix come
  from it on the device, so neither the graph nor a kernel specialises on its value, and
  filling them is a kernel launch, not a host sync. The Triton kernel masks the padding rows
  out; the CPU reference computes the real rows alone (a softmax over more masked keys could
  round differently), which makes the bit-for-bit claim below hold by construction;
* **no host reads and no Python branches on data** inside: tokens, positions, ancestor bits and
  the length are copied into the bucket's buffers before a replay; the logits come back in the
  bucket's output buffer (returned as a view: valid until this stage's next forward, which
  every caller respects, as it consumes the logits before its next step).

Manual ``torch.cuda.CUDAGraph`` capture, not ``torch.compile(mode="reduce-overhead")``
(docs/KERNELS.md, "Captured steps", gives the reasons); :func:`static_step` stays traceable by
``torch.compile(fullgraph=True)`` (tested on CPU), so compiling it before capture remains open.
"""

from __future__ import annotations

import torch

import pipespec_fast.custom_ops  # noqa: F401  (registers torch.ops.pipespec.*)
from pipespec_fast import ops, reference
from pipespec_fast.cpu.linear import current_threads
from pipespec_fast.kv_cache import KVCache
from pipespec_fast.models import packed as packed_weights
from pipespec_fast.models.llama import rope_tables

MAX_N = 64  # the largest bucket: verify blocks (MAX_WINDOW drafts, trees of 64 nodes) fit


def buckets(max_n: int = MAX_N) -> tuple[int, ...]:
    """The block sizes steps run in: powers of two up to ``max_n`` (and ``max_n`` itself)."""
    out = [1]
    while out[-1] * 2 < max_n:
        out.append(out[-1] * 2)
    return tuple(sorted({*out, max_n}))


def static_step(model, tokens: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor,
                cache_len: torch.Tensor, n_valid: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """One forward of a block of ``B`` tokens whose shapes are all fixed by ``B``.

    Args:
        model: a ``models.llama.Transformer`` (its torch layers; weights on ``k``'s device).
        tokens: ``[B]`` int64 ids (padding rows: any valid id).
        depths: ``[B]`` int64 depth of each node in its block (a chain: ``0..B-1``).
        bits: ``[B, ceil(B / 32)]`` int32 ancestor-or-self bits (``reference`` module doc).
        cache_len: 0-d int32 tensor on the device: the slots cached before the block.
        n_valid: 0-d int32 tensor on the device: the real rows (the rest are padding).
        k, v: the cache's ``[n_layers, kv_heads, max_len, head_dim]`` storage; slots
            ``[cache_len, cache_len + B)`` are written.
        aligned: batch-invariant mode's attention (``ops.verify_attention_static``): a chain row's
            bits depend on neither the block's start nor its length.

    Returns ``[B, vocab_size]`` fp32 logits. Nothing here reads a tensor's value on the host
    or branches on one, so the step can be captured as a CUDA graph and traced whole by
    ``torch.compile``.
    """
    cos, sin = rope_tables(cache_len + depths, model.inv_freq, model.norm.weight.dtype)
    rows = tokens if model.vocab is None else model.vocab.embedding_rows(tokens)
    x = model.tok_embeddings(rows)
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, k[i], v[i], (cache_len, n_valid, aligned), bits)
    return model.head(x)


def fused_step(model, tokens: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor,
               start: int, cache: KVCache) -> torch.Tensor | None:
    """:func:`static_step` on the CPU's fused C layer stack, where the eager forward would
    use it (fp32 on CPU, ``model.use_fused``), else ``None``. The stack is batch invariant
    (``tests/test_cpu_decoder.py``), so the real rows are the eager unpadded forward's bit for
    bit, trees included; the head runs on every row, as on CUDA."""
    cos, sin = rope_tables(start + depths, model.inv_freq, model.norm.weight.dtype)
    rows = tokens if model.vocab is None else model.vocab.embedding_rows(tokens)
    x = model.tok_embeddings(rows).contiguous()
    plan = packed_weights.fused_plan(model, x, cache, x.shape[0])
    if plan is None:
        return None
    plan.run(x, cos, sin, bits, cache.k, cache.v, start, current_threads())
    return model.head(x)


class _Bucket:
    """The static buffers of one bucket size and, on CUDA, its captured graph."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.int64, device=device)
        self.chain_depths = torch.arange(size, dtype=torch.int64, device=device)
        self.chain_bits = reference.chain_ancestor_bits(size, device)
        self.depths = self.chain_depths.clone()
        self.bits = self.chain_bits.clone()
        self.chain = True  # what depths/bits hold now
        self.pad = torch.full((size,), -1, dtype=torch.int64, device=device)  # roots
        self.graph = None
        self.out = None

    def set_layout(self, parents: torch.Tensor | None, n: int) -> None:
        """Chain (kept until a tree comes) or the tree of ``parents: [n]``, padded with roots."""
        if parents is None:
            if not self.chain:
                self.depths.copy_(self.chain_depths)
                self.bits.copy_(self.chain_bits)
                self.chain = True
            return
        full = torch.cat([parents.to(torch.int64), self.pad[n:]])
        self.depths.copy_(reference.tree_depths(full))
        self.bits.copy_(reference.ancestor_bits(full))
        self.chain = False


class StaticSteps:
    """A stage's captured steps: :meth:`forward` has ``Transformer.forward``'s contract for
    blocks of up to ``max_n`` tokens (:meth:`fits`); larger blocks (a prefill) stay eager.

    ``capture`` (default: whether the cache is on CUDA, served by Triton) replays each
    bucket as a CUDA graph, captured on its first use or by :meth:`warm_up` (at load: a
    capture synchronises the device, which must not happen mid-generation); without it the
    same step runs eagerly."""

    def __init__(self, model, cache: KVCache, max_n: int = MAX_N,
                 capture: bool | None = None, batch_invariant: bool = False,
                 limit: int | None = None) -> None:
        self.model, self.cache = model, cache
        # the stage's context: real tokens stop here, padding rows may use the slots past it
        self.limit = cache.max_len if limit is None else limit
        self.device = cache.k.device
        if capture is None:  # the reference reads lengths on the host: not capturable
            capture = self.device.type == "cuda" and ops.backend_for(cache.k) == "triton"
        self.capture = capture
        # batch-invariant mode: one bucket, so every product has one shape (M = max_n)
        self.batch_invariant = batch_invariant
        self.sizes = (max_n,) if batch_invariant else buckets(max_n)
        self.length = torch.zeros((), dtype=torch.int32, device=self.device)
        self.valid = torch.ones((), dtype=torch.int32, device=self.device)
        self._buckets: dict[int, _Bucket] = {}
        self.replays = 0  # steps served (tests, benchmarks)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def fits(self, n: int) -> bool:
        """Whether a block of ``n`` tokens runs here now: a bucket holds it (batch-invariant
        mode: any ``n``, in chunks of the one bucket), its tokens stay within the stage's
        context (``limit``) and the cache has room for its padding rows too."""
        top, length = self.sizes[-1], self.cache.length
        b = -(-n // top) * top if self.batch_invariant else self.bucket_for(n)
        return (n > 0 and b is not None and length + n <= self.limit
                and length + b <= self.cache.max_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                last_n: int | None = None) -> torch.Tensor:
        """``Transformer.forward(tokens, cache, parents, last_n)`` in the bucket of
        ``n = len(tokens)`` (``fits(n)`` must hold); the logits are a view of the bucket's
        output, valid until this stage's next forward."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens: expected a 1-D tensor of ids, got {tuple(tokens.shape)}")
        n = tokens.shape[0]
        if not self.fits(n):
            raise ValueError(f"captured step: a block of {n} tokens does not fit (buckets "
                             f"{self.sizes}, cache {self.cache.length}/{self.limit})")
        if n > self.sizes[-1]:
            return self._chunked(tokens, parents, last_n)
        return self._block(tokens, parents, last_n)

    def _chunked(self, tokens: torch.Tensor, parents: torch.Tensor | None,
                 last_n: int | None) -> torch.Tensor:
        """Batch-invariant mode's long chain (a prefill): chunks of the one bucket in order, each
        chunk's logits kept where they fall in the last ``last_n`` rows (copied: the next
        chunk reuses the bucket's output buffer). A failure restores the cache's length."""
        if parents is not None:
            raise ValueError(f"captured step: a tree of {tokens.shape[0]} nodes does not fit "
                             f"the bucket of {self.sizes[-1]}")
        n, top, start = tokens.shape[0], self.sizes[-1], self.cache.length
        first = n - (n if last_n is None else last_n)  # the first row whose logits are kept
        kept = []
        try:
            for lo in range(0, n, top):
                hi = min(lo + top, n)
                out = self._block(tokens[lo:hi], None, max(0, hi - max(lo, first)))
                if hi > first:
                    kept.append(out.clone())
        except BaseException:
            self.cache.length = start
            raise
        return torch.cat(kept) if kept else out  # last_n = 0: the last chunk's empty rows

    def _block(self, tokens: torch.Tensor, parents: torch.Tensor | None,
               last_n: int | None) -> torch.Tensor:
        n = tokens.shape[0]
        b = self._bucket(self.bucket_for(n))
        start = self.cache.reserve(n)
        try:
            b.tokens[:n].copy_(tokens, non_blocking=True)
            b.set_layout(parents, n)
            self.length.fill_(start)
            self.valid.fill_(n)
            out = self._run(b)
        except BaseException:
            self.cache.length = start
            raise
        self.replays += 1
        return out[n - (n if last_n is None else last_n) : n]

    def warm_up(self) -> None:
        """Capture every bucket now (CUDA; on the CPU nothing is prepared ahead). A bucket
        whose rows would not fit after the cached slots waits for its first use."""
        if self.capture:
            for size in self.sizes:
                if self.cache.length + size <= self.cache.max_len:
                    self._bucket(size)

    def _bucket(self, size: int) -> _Bucket:
        b = self._buckets.get(size)
        if b is None:
            b = self._buckets[size] = _Bucket(size, self.device)
            if self.capture:
                self._capture(b)
        return b

    def _step(self, b: _Bucket) -> torch.Tensor:
        c = self.cache
        if self.device.type == "cpu":
            out = fused_step(self.model, b.tokens, b.depths, b.bits, int(self.length), c)
            if out is not None:
                return out
        return static_step(self.model, b.tokens, b.depths, b.bits, self.length, self.valid,
                           c.k, c.v, aligned=self.batch_invariant)

    def _run(self, b: _Bucket) -> torch.Tensor:
        if b.graph is None:
            return self._step(b)
        b.graph.replay()
        return b.out

    @torch.inference_mode()
    def _capture(self, b: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles its kernels, cuBLAS picks its
        algorithms), then capture. The length is the cache's meanwhile: the writes land in
        the slots after the valid ones, which the cache does not count (its length stays),
        and callers make sure they exist (``fits``, ``warm_up``)."""
        self.length.fill_(self.cache.length)
        self.valid.fill_(b.size)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another stage's thread may queue work meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            b.out = self._step(b)
        b.graph = graph
