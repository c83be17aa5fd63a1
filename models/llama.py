"""A minimal LLaMA: RMSNorm, RoPE (incl. llama3 scaling), GQA attention, SwiGLU, tied/untied head.

The forward takes a block of ``n`` new tokens (a chain, or a tree given by ``parents``), writes
their K/V into the stage's preallocated :class:`~pipespec_fast.kv_cache.KVCache` at slots
``[cache.length, cache.length + n)`` and attends through ``pipespec_fast.ops.verify_attention``
(Triton on CUDA, the torch reference on CPU). Weights are kept fused (QKV, gate/up) so a layer
is five matmuls.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipespec_fast import config as runtime_config
from pipespec_fast import ops, reference
from pipespec_fast.cpu.linear import Linear, current_threads
from pipespec_fast.kv_cache import KVCache
from pipespec_fast.models import hf_names
from pipespec_fast.models import packed as packed_weights
from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig, subset_ids_problem

__all__ = ["LAYER_PARAMS", "LlamaConfig", "Transformer", "rope_inv_freq", "vocab_subset_rows"]

# Each parameter of a ``Block`` (by submodule) and the HF tensors it holds, stacked by rows:
# q/k/v are one matmul, gate/up another, so a layer is five matmuls.
LAYER_PARAMS: dict[str, tuple[str, ...]] = {
    "attention.wqkv": (hf_names.Q, hf_names.K, hf_names.V),
    "attention.wo": (hf_names.O,),
    "feed_forward.w13": (hf_names.GATE, hf_names.UP),
    "feed_forward.w2": (hf_names.DOWN,),
    "attention_norm": (hf_names.ATTN_NORM,),
    "ffn_norm": (hf_names.FFN_NORM,),
}


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` fp32 (as transformers computes them), with llama3
    scaling when configured."""
    d = cfg.head_dim
    # on CPU even inside a meta-device context (a model under construction): torch's meta
    # arange imports its symbolic-shape machinery (sympy, ~150 MB resident for good)
    steps = torch.arange(0, d, 2, dtype=torch.int64, device="cpu")
    inv = 1.0 / (cfg.rope_theta ** (steps.float() / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    factor = float(sc["factor"])
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """``(cos, sin)``, each ``[n, head_dim]`` in ``dtype``, for positions ``pos: [n]``
    (``inv_freq: [head_dim // 2]`` fp32; angles computed in fp32, as transformers does)."""
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def block_layout(n: int, start: int, parents: torch.Tensor | None, device,
                 chain_bits: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor bits ``[n, ceil(n / 32)]`` int32 and positions ``[n]`` of a block of ``n`` new
    tokens after ``start`` cached ones: a chain, or the tree of ``parents: [n]``. A chain's
    bits depend on ``n`` alone and are kept in ``chain_bits`` (one dict per model)."""
    if parents is None:
        bits = chain_bits.get(n)
        if bits is None or bits.device != device:
            bits = reference.chain_ancestor_bits(n, device)
            chain_bits[n] = bits
        return bits, torch.arange(start, start + n, device=device)
    return reference.ancestor_bits(parents), start + reference.tree_depths(parents)


def fuse_hf_state(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our parameter names for HF-named tensors (:data:`LAYER_PARAMS`; fused ones are
    concatenated, the others passed through as they are). No head when it is tied. A
    parameter whose tensors are all absent (matrices loaded only in packed form:
    ``packed.covered_names``) is left out; one with some parts absent raises ``KeyError``."""
    groups = {"tok_embeddings.weight": (hf_names.EMBED,), "norm.weight": (hf_names.FINAL_NORM,)}
    if not cfg.tie_word_embeddings:
        groups["output.weight"] = (hf_names.HEAD,)
    for i in range(cfg.n_layers):
        for path, parts in LAYER_PARAMS.items():
            groups[f"layers.{i}.{path}.weight"] = tuple(hf_names.layer(i, p) for p in parts)
    sd = {}
    for key, names in groups.items():
        if all(n not in hf for n in names):
            continue
        ts = [hf[n] for n in names]
        sd[key] = ts[0] if len(ts) == 1 else torch.cat(ts)
    return sd


def vocab_subset_rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: each token's embedding row in a vocabulary-subset model (its
    index in ``ids``, or ``len(ids)``, the shared row, for tokens outside the subset)."""
    rows = torch.full((vocab_size,), ids.numel(), dtype=torch.int64)
    rows[ids] = torch.arange(ids.numel())
    return rows


class Embedding(nn.Embedding):
    """The token embedding; ``packed`` (a :class:`~pipespec_fast.cpu.quant.PackedWeight` of the
    same rows) may hold it instead of ``weight``, which is then a meta placeholder: a lookup
    dequantises the rows it gathers (exactly the fp32 values; :mod:`..packed`)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__(rows, dim)
        self.packed = None

    def reset_parameters(self) -> None:
        # A model is built on the meta device and then given its weights: a random init there
        # is useless, and meta random ops import torch's Python decompositions (sympy, triton:
        # ~150 MB resident for the rest of the process).
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.is_meta and self.packed is not None:
            flat = ids.reshape(-1).cpu()
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.packed.m):
                raise IndexError(f"embedding: ids outside [0, {self.packed.m})")
            return self.packed.rows(flat).dequantize().view(*ids.shape, -1)
        return super().forward(ids)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta and self.packed is not None:
            destination[prefix + "weight"] = self.packed.dequantize()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [n, heads, head_dim]`` (HF half-split layout) by ``cos/sin: [n, head_dim]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_out = cfg.n_heads * cfg.head_dim
        self.kv_out = cfg.n_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.dim, self.q_out + 2 * self.kv_out)
        self.wo = Linear(self.q_out, cfg.dim)

    def forward(self, x, cos, sin, k_cache, v_cache, cache_len, anc_bits):
        """``cache_len``: the cached slots, an int; or a captured step's ``(length, n_valid,
        aligned)``: 0-d int tensors on the device (``decoding/captured.py``: rows from
        ``n_valid`` on are padding) and exact mode's flag (``ops.verify_attention_static``)."""
        n = x.shape[0]
        qkv = self.wqkv(x)
        q = qkv[:, : self.q_out].view(n, self.n_heads, self.head_dim)
        k = qkv[:, self.q_out : self.q_out + self.kv_out].view(n, self.n_kv, self.head_dim)
        v = qkv[:, self.q_out + self.kv_out :].view(n, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache_len, tuple):  # a captured step's (length, real rows, aligned)
            length, n_valid, aligned = cache_len
            out = torch.ops.pipespec.verify_attention_static(q, k, v, k_cache, v_cache, length,
                                                             anc_bits, n_valid, aligned=aligned)
        else:
            out = ops.verify_attention(q, k, v, k_cache, v_cache, cache_len, anc_bits)
        return self.wo(out.reshape(n, self.q_out))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size)
        self.w2 = Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        return self.w2(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :])


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, k_cache, v_cache, cache_len, anc_bits):
        h = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, cache_len,
                               anc_bits)
        return h + self.feed_forward(self.ffn_norm(h))


class VocabSubset(nn.Module):
    """A draft's reduced vocabulary (``LlamaConfig.vocab_subset``) at the model's two ends:
    token ids in -> embedding rows, head rows out -> full-vocabulary logits. It holds no
    weights, only two id tables, filled from the checkpoint's ids by :meth:`install`."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        # token id -> embedding row (``S`` for tokens outside the subset), ``[vocab_size]``
        self.register_buffer("rows", None, persistent=False)
        self.register_buffer("ids", None, persistent=False)  # head row -> token id, ``[S]``

    def install(self, ids: torch.Tensor, device: torch.device) -> None:
        """Take the subset's ascending token ids ``[S]`` (``ValueError`` if they are not)."""
        ids = ids.to(torch.int64).flatten()
        problem = subset_ids_problem(ids, self.config)
        if problem:
            raise ValueError(f"vocab subset: {problem}")
        rows = vocab_subset_rows(ids.cpu(), self.config.vocab_size)
        self.ids, self.rows = ids.to(device), rows.to(device)

    def embedding_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n]`` embedding rows of ``tokens: [n]``; an out-of-vocabulary id raises
        ``IndexError`` (an embedding lookup checks the range without a host sync)."""
        if self.rows is None:
            raise RuntimeError("a vocab-subset model needs set_vocab_subset() before use")
        return F.embedding(tokens, self.rows[:, None]).squeeze(-1)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n, vocab_size]`` logits from the head's ``[n, S]``: ``-inf`` outside the subset."""
        full = logits.new_full((logits.shape[0], self.config.vocab_size), -math.inf)
        full[:, self.ids] = logits
        return full


class Transformer(nn.Module):
    """LLaMA decoder. Batch 1; the batch of a verify step is its block of new tokens. On CPU
    fp32, every layer runs in one C call (``use_fused``) with matmuls on the packed weights
    where the checkpoint has them, which then replace the fp32 matrices
    (:mod:`pipespec_fast.models.packed`); the torch layers are the reference both are tested
    against."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.embedding_rows, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.output = Linear(cfg.dim, cfg.head_rows)
        self.vocab = None if cfg.vocab_subset is None else VocabSubset(cfg)
        self._tie_output()
        self.register_buffer("inv_freq", _rope_buffer(cfg), persistent=False)
        self._chain_bits: dict[int, torch.Tensor] = {}
        self.use_fused = True  # CPU fp32: run the layers through pipespec_fast.cpu.decoder
        self._plan = None  # the fused path's layer table, built on first use
        self.compute = "exact"  # products on packed weights: models.packed.set_compute

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", packed: bool | None = None,
                        ) -> Transformer:
        """Load a Hugging Face-layout safetensors checkpoint (single file or sharded).

        ``packed`` (default: on unless ``PIPESPEC_PACKED=0``): for an fp32 model on CPU where
        the packed-weight kernel runs, the matrices stored compactly (fp16, a converted GGUF's
        blocks) are kept so, checked against a few fp32 rows each (:mod:`.packed`);
        ``packed=False`` loads every matrix in fp32."""
        return _load(cls, model_dir, dtype, device, packed)

    def load_hf_state_dict(self, hf: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors (already validated), fusing QKV and gate/up."""
        self.load_state_dict(fuse_hf_state(hf, self.config), strict=False, assign=True)
        self._tie_output()
        if self.config.vocab_subset is not None:
            self.set_vocab_subset(hf[VOCAB_SUBSET_IDS])
        self.requires_grad_(False)  # inference only: lets CPU matmuls view weights as numpy

    def set_vocab_subset(self, ids: torch.Tensor) -> None:
        """Install the subset's ascending token ids ``[S]`` (see ``LlamaConfig.vocab_subset``)."""
        if self.vocab is None:
            raise ValueError("set_vocab_subset: the config has no vocab_subset")
        self.vocab.install(ids, self.norm.weight.device)

    def attach_packed(self, weights: dict, source: str = "checkpoint", reference=None,
                      keep_fp32: bool = False) -> int:
        """Give the matmuls packed copies of their weights (HF name -> ``PackedWeight``,
        checked against fp32 rows) and drop the fp32 matrices they replace unless
        ``keep_fp32``: :func:`~pipespec_fast.models.packed.attach_packed`; a count."""
        return packed_weights.attach_packed(self, weights, source, reference, keep_fp32)

    def materialize_fp32(self) -> None:
        """Matrices held only in packed form get their fp32 weights back (packed copies stay)."""
        packed_weights.materialize(self)

    def packed_bytes(self) -> int:  # held by packed weight copies (0 when none are attached)
        return packed_weights.packed_bytes(self)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A KV cache for this model (default: the config's context length)."""
        cfg, w = self.config, self.norm.weight  # never packed: the model's dtype and device
        return KVCache(cfg.n_layers, cfg.n_kv_heads, max_len or cfg.max_position_embeddings,
                       cfg.head_dim, w.dtype, w.device)

    # ------------------------------------------------------------------ keeping weights in step
    def _tie_output(self) -> None:
        """A tied head shares the embedding; a subset model's, the subset's rows (a view: the
        shared last row is input-only)."""
        cfg, w = self.config, self.tok_embeddings.weight
        if cfg.tie_word_embeddings and cfg.vocab_subset is None:
            self.output.weight = w
        elif cfg.tie_word_embeddings:
            self.output.weight = nn.Parameter(w.data[: cfg.vocab_subset], requires_grad=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; new weights also drop the packed copies and the fused
        path's table, which point at the old ones (matrices held only in packed form get their
        fp32 values back first, so a partial ``strict=False`` load keeps the others)."""
        packed_weights.drop_fast_path(self)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse=True):
        saved = self.inv_freq.clone()  # rope's frequencies stay fp32 (_keep_rope_fp32)
        # matrices held only in packed form: restored first unless the model stays CPU fp32
        with packed_weights.converting(self, fn):
            out = super()._apply(fn, recurse)
        _keep_rope_fp32(self, saved)
        self._plan = None
        # .to()/.half() convert each parameter on its own: re-tie a subset head afterwards
        if self.config.vocab_subset is not None and not self.tok_embeddings.weight.is_meta:
            self._tie_output()
        w = self.norm.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":  # packed copies are CPU fp32
            packed_weights.drop_fast_path(self)
        return out

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, parents: torch.Tensor | None = None,
                last_n: int | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``n`` new tokens through the model, appending their K/V to ``cache``; returns
        ``[last_n, vocab_size]`` fp32 logits.

        Args:
            tokens: ``[n]`` int64 token ids.
            cache: this model's cache; node ``i`` goes to slot ``cache.length + i`` and
                ``cache.length`` grows by ``n`` (roll back or ``keep_path`` afterwards).
            parents: ``[n]`` tree parents (``reference`` module doc); ``None`` for a chain.
            last_n: compute logits only for the last ``last_n`` tokens (default: all).
            features: ``[>= cache.length + n, dim]``: rows at the new slots get the final norm
                of the last layer's output (a feature head's input)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens: expected a 1-D tensor of ids, got {tuple(tokens.shape)}")
        n = tokens.shape[0]
        start = cache.reserve(n)
        try:
            bits, pos = block_layout(n, start, parents, tokens.device, self._chain_bits)
            cos, sin = rope_tables(pos, self.inv_freq, self.norm.weight.dtype)
            rows = tokens if self.vocab is None else self.vocab.embedding_rows(tokens)
            x = self._layers(self.tok_embeddings(rows), cos, sin, bits, cache, start)
            if features is not None:
                features[start : start + n] = self.norm(x)
            return self.head(x if last_n is None else x[n - last_n :])
        except BaseException:
            cache.length = start
            raise

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``[m, vocab_size]`` fp32 logits of the last layer's ``x: [m, dim]`` (final norm, head,
        a subset model's rows spread over the full vocabulary)."""
        logits = self.output(self.norm(x)).float()
        return logits if self.vocab is None else self.vocab.full_logits(logits)

    def _layers(self, x, cos, sin, bits, cache: KVCache, start: int) -> torch.Tensor:
        """Every decoder layer over ``x: [n, dim]``: one C call where the fused path applies
        (CPU fp32), else the torch layers."""
        plan = packed_weights.fused_plan(self, x, cache, x.shape[0])
        if plan is not None:
            x = x.contiguous()
            plan.run(x, cos, sin, bits, cache.k, cache.v, start, current_threads())
            return x
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = cache.layer(i)
            x = layer(x, cos, sin, k_cache, v_cache, start, bits)
        return x


def _rope_buffer(cfg: LlamaConfig) -> torch.Tensor:
    """``rope_inv_freq`` (computed on the CPU, see there) on the device a model is being built
    on (a ``torch.device`` context), the CPU for a meta build (the loader sets it)."""
    inv_freq = rope_inv_freq(cfg)
    here = torch.get_default_device()
    return inv_freq if here.type in ("cpu", "meta") else inv_freq.to(here)


def _keep_rope_fp32(model: Transformer, saved: torch.Tensor) -> None:
    """After a conversion (``to``, ``half``): rope's inverse frequencies moved with the model,
    but stay fp32 as transformers keeps them (``saved``: a copy from before; a conversion may
    swap the buffer's data in place)."""
    if saved.dtype == torch.float32 and model.inv_freq.dtype != torch.float32 and \
            saved.device.type != "meta":
        model.inv_freq = saved.to(model.inv_freq.device)


def _load(cls, model_dir, dtype: torch.dtype, device, packed: bool | None) -> Transformer:
    """:meth:`Transformer.from_pretrained`: build on the meta device, then assign the loaded
    tensors; with packed weights, the matrices they cover are never read in fp32."""
    from pipespec_fast.cpu import quant
    from pipespec_fast.models.checkpoint import load_packed, load_state_dict

    cfg = LlamaConfig.from_dir(model_dir)
    if packed is None:
        packed = runtime_config.current().packed
    packed = bool(packed and dtype == torch.float32 and torch.device(device).type == "cpu"
                  and quant.available())
    weights = load_packed(model_dir, cfg) if packed else {}
    covered = packed_weights.covered_names(cfg, weights)
    hf = load_state_dict(model_dir, cfg, dtype=dtype, device="cpu", skip=covered)
    with torch.device("meta"):
        model = cls(cfg)
    model.load_hf_state_dict(hf)  # the covered matrices stay meta placeholders
    model.inv_freq = rope_inv_freq(cfg)
    if packed:  # checked against rows read from the checkpoint alone
        packed_weights.attach_loaded(model, model_dir, weights, covered)
        return model.eval()
    return model.to(device=device).eval()
