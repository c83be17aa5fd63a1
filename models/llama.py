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
from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig

__all__ = ["LlamaConfig", "Transformer", "rope_inv_freq", "vocab_subset_rows"]


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` fp32 (as transformers computes them), with llama3
    scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


def vocab_subset_rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: each token's embedding row in a vocabulary-subset model (its
    index in ``ids``, or ``len(ids)``, the shared row, for tokens outside the subset)."""
    rows = torch.full((vocab_size,), ids.numel(), dtype=torch.int64)
    rows[ids] = torch.arange(ids.numel())
    return rows


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
        n = x.shape[0]
        qkv = self.wqkv(x)
        q = qkv[:, : self.q_out].view(n, self.n_heads, self.head_dim)
        k = qkv[:, self.q_out : self.q_out + self.kv_out].view(n, self.n_kv, self.head_dim)
        v = qkv[:, self.q_out + self.kv_out :].view(n, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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


class Transformer(nn.Module):
    """LLaMA decoder. Batch 1; the batch of a verify step is its block of new tokens."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.embedding_rows, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.output = Linear(cfg.dim, cfg.head_rows)
        self._tie_output()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # With a vocabulary subset: token id -> embedding row (``S`` for tokens outside the
        # subset) and head row -> token id.
        self.register_buffer("vocab_rows", None, persistent=False)
        self.register_buffer("vocab_ids", None, persistent=False)
        self._chain_bits: dict[int, torch.Tensor] = {}
        self.use_fused = True  # CPU fp32: run the layers through pipespec_fast.cpu.decoder
        self._plan = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        packed: bool | None = None,
    ) -> Transformer:
        """Load a Hugging Face-layout safetensors checkpoint (single file or sharded).

        ``packed`` (default: on unless ``PIPESPEC_PACKED=0``): for an fp32 model on CPU where
        the packed-weight kernel runs, keep the matrices the checkpoint stores compactly (fp16
        tensors, a converted GGUF's blocks) in that form as well (:meth:`attach_packed`).
        """
        from pipespec_fast.cpu import quant
        from pipespec_fast.models.checkpoint import load_packed, load_state_dict

        cfg = LlamaConfig.from_dir(model_dir)
        hf = load_state_dict(model_dir, cfg, dtype=dtype, device="cpu")
        with torch.device("meta"):
            model = cls(cfg)
        model.load_hf_state_dict(hf)
        model.inv_freq = rope_inv_freq(cfg)
        model = model.to(device=device).eval()
        if packed is None:
            packed = runtime_config.current().packed
        if packed and dtype == torch.float32 and torch.device(device).type == "cpu" and \
                quant.available():
            model.attach_packed(load_packed(model_dir, cfg), source=str(model_dir))
        return model

    def attach_packed(self, packed: dict, source: str = "checkpoint") -> int:
        """Give the matmuls packed copies of their weights (HF name -> ``PackedWeight``).

        Fused matrices (QKV, gate/up) get one when all their parts are packed alike; the tied
        head uses the embedding's (its subset rows). Each attached matrix is checked against
        the fp32 weight on its first and last rows (``ValueError`` naming the tensor: a packed
        file that does not belong to these weights). Returns the number of matmuls attached.
        """
        from pipespec_fast.cpu.quant import PackedWeight

        def join(names: list[str]) -> PackedWeight | None:
            parts = [packed.get(n) for n in names]
            if any(p is None for p in parts) or len({(p.kind, p.k) for p in parts}) != 1:
                return None
            if len(parts) == 1:
                return parts[0]
            return PackedWeight(torch.cat([p.data for p in parts]), parts[0].kind, parts[0].k)

        def probe_rows(names: list[str]) -> list[int]:
            """Rows to compare per part: first, last, a few inside (the q/k un-permutation
            moves rows inside a head; the ends of a part are its fixed points)."""
            rows, off = [], 0
            for name in names:
                r = packed[name].m
                rows += sorted({off, off + r - 1, off + r // 2, off + min(r - 1, self.config
                                .head_dim // 2 + 1), off + (r * 7) // 13})
                off += r
            return rows

        plan: list[tuple[Linear, list[str], PackedWeight | None]] = []
        for i, layer in enumerate(self.layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            for mod, names in (
                (layer.attention.wqkv, [a + "q_proj.weight", a + "k_proj.weight",
                                        a + "v_proj.weight"]),
                (layer.attention.wo, [a + "o_proj.weight"]),
                (layer.feed_forward.w13, [m + "gate_proj.weight", m + "up_proj.weight"]),
                (layer.feed_forward.w2, [m + "down_proj.weight"]),
            ):
                plan.append((mod, names, join(names)))
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else \
            "lm_head.weight"
        pw = join([head])
        if pw is not None and self.config.vocab_subset is not None and \
                self.config.tie_word_embeddings:
            pw = pw.rows(slice(0, self.config.vocab_subset))
        plan.append((self.output, [head], pw))
        count = 0
        for mod, names, pw in plan:
            if pw is None:
                continue
            w = mod.weight
            if pw.shape != tuple(w.shape):
                raise ValueError(f"{source}: packed {'+'.join(names)} has shape {pw.shape}, "
                                 f"the model's weight {tuple(w.shape)}")
            rows = [r for r in probe_rows(names) if r < w.shape[0]]
            if not torch.equal(pw.rows(rows).dequantize(), w.detach()[rows].float().cpu()):
                raise ValueError(f"{source}: packed {'+'.join(names)} does not hold the "
                                 "checkpoint's weights (values differ)")
            mod.packed = pw
            count += 1
        self._plan = None
        return count

    def packed_bytes(self) -> int:
        """Bytes held by packed weight copies (0 when none are attached)."""
        return sum(m.packed.nbytes() for m in self.modules()
                   if isinstance(m, Linear) and m.packed is not None)

    def load_hf_state_dict(self, hf: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors (already validated), fusing QKV and gate/up."""
        sd: dict[str, torch.Tensor] = {
            "tok_embeddings.weight": hf["model.embed_tokens.weight"],
            "norm.weight": hf["model.norm.weight"],
        }
        if not self.config.tie_word_embeddings:
            sd["output.weight"] = hf["lm_head.weight"]
        for i in range(self.config.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
                [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]]
            )
            sd[f"layers.{i}.attention.wo.weight"] = hf[a + "o_proj.weight"]
            m = p + "mlp."
            sd[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
                [hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]
            )
            sd[f"layers.{i}.feed_forward.w2.weight"] = hf[m + "down_proj.weight"]
            sd[f"layers.{i}.attention_norm.weight"] = hf[p + "input_layernorm.weight"]
            sd[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        self.load_state_dict(sd, strict=False, assign=True)
        self._tie_output()
        if self.config.vocab_subset is not None:
            self.set_vocab_subset(hf[VOCAB_SUBSET_IDS])
        self.requires_grad_(False)  # inference only: lets CPU matmuls view weights as numpy

    def _tie_output(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        w = self.tok_embeddings.weight
        if self.config.vocab_subset is None:
            self.output.weight = w
        else:  # the head shares the subset's rows (a view; the shared last row is input-only)
            self.output.weight = nn.Parameter(w.data[: self.config.vocab_subset],
                                              requires_grad=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; new weights also drop the packed copies and the fused
        path's table, which point at the old ones."""
        self._drop_fast_path()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _drop_fast_path(self) -> None:
        self._plan = None
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = None

    def _apply(self, fn, recurse=True):
        # .to()/.half() convert each parameter on its own: re-tie a subset head afterwards
        out = super()._apply(fn, recurse)
        self._plan = None
        if self.config.vocab_subset is not None:
            self._tie_output()
        w = self.tok_embeddings.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":  # packed copies are CPU fp32
            self._drop_fast_path()
        return out

    def set_vocab_subset(self, ids: torch.Tensor) -> None:
        """Install the subset's ascending token ids ``[S]`` (see ``LlamaConfig.vocab_subset``)."""
        cfg = self.config
        if cfg.vocab_subset is None:
            raise ValueError("set_vocab_subset: the config has no vocab_subset")
        ids = ids.to(torch.int64).flatten()
        if ids.numel() != cfg.vocab_subset:
            raise ValueError(f"vocab subset: {ids.numel()} ids for vocab_subset={cfg.vocab_subset}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size or
                            (ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()))):
            raise ValueError(
                f"vocab subset: ids must be strictly ascending in [0, {cfg.vocab_size})")
        rows = vocab_subset_rows(ids.cpu(), cfg.vocab_size)
        dev = self.tok_embeddings.weight.device
        self.vocab_ids, self.vocab_rows = ids.to(dev), rows.to(dev)

    PACKED_MAX_BLOCK = 64
    """Blocks of more tokens (a prompt's prefill) run on the fp32 weights even when packed
    copies exist: the product is then compute-bound and the packed kernel's in-register
    dequantisation costs more than the bytes it saves (measured: 160 tokens 194 ms vs 248 ms on
    2 threads). Verification blocks are smaller (``FastPipeline`` windows are at most 48), so
    every generated token sees the packed path, decoded or verified alike."""

    def _decoder_plan(self, x: torch.Tensor, cache: KVCache, dense: bool = False):
        """The fused CPU layer stack (:mod:`pipespec_fast.cpu.decoder`) when it applies: fp32
        weights, activations and cache on CPU, and ``use_fused`` (default on). ``dense``: the
        table on the fp32 weights."""
        if not self.use_fused or x.dtype != torch.float32 or x.device.type != "cpu" or \
                cache.k.dtype != torch.float32 or cache.k.device.type != "cpu" or \
                self.tok_embeddings.weight.dtype != torch.float32:
            return None
        if self._plan is None:
            from pipespec_fast.cpu import decoder as cpu_decoder

            if not cpu_decoder.available():
                self.use_fused = False
                return None
            self._plan = (cpu_decoder.DecoderPlan(self),
                          cpu_decoder.DecoderPlan(self, use_packed=False))
        return self._plan[1 if dense else 0]

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A KV cache for this model (default: the config's context length)."""
        cfg = self.config
        max_len = max_len or cfg.max_position_embeddings
        w = self.tok_embeddings.weight
        return KVCache(cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim, w.dtype, w.device)

    # ------------------------------------------------------------------ forward

    def _bits_and_positions(self, n: int, start: int, parents: torch.Tensor | None, device):
        if parents is None:
            bits = self._chain_bits.get(n)
            if bits is None or bits.device != device:
                bits = reference.ancestor_bits(reference.chain_parents(n, device))
                self._chain_bits[n] = bits
            pos = torch.arange(start, start + n, device=device)
        else:
            bits = reference.ancestor_bits(parents)
            pos = start + reference.tree_depths(parents)
        return bits, pos

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        parents: torch.Tensor | None = None,
        last_n: int | None = None,
    ) -> torch.Tensor:
        """Run ``n`` new tokens through the model, appending their K/V to ``cache``.

        Args:
            tokens: ``[n]`` int64 token ids.
            cache: this model's cache; node ``i`` goes to slot ``cache.length + i`` and
                ``cache.length`` grows by ``n`` (roll back or ``keep_path`` afterwards).
            parents: ``[n]`` tree parents (``reference`` module doc); ``None`` for a chain.
            last_n: compute logits only for the last ``last_n`` tokens (default: all).

        Returns:
            ``[last_n, vocab_size]`` fp32 logits.
        """
        if tokens.dim() != 1:
            raise ValueError(f"tokens: expected a 1-D tensor of ids, got {tuple(tokens.shape)}")
        n = tokens.shape[0]
        start = cache.reserve(n)
        try:
            bits, pos = self._bits_and_positions(n, start, parents, tokens.device)
            freqs = pos.float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            dtype = self.tok_embeddings.weight.dtype
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            if self.config.vocab_subset is None:
                x = self.tok_embeddings(tokens)
            elif self.vocab_rows is None:
                raise RuntimeError("a vocab-subset model needs set_vocab_subset() before use")
            else:  # an embedding lookup checks the ids' range without a host sync
                rows = F.embedding(tokens, self.vocab_rows[:, None]).squeeze(-1)
                x = self.tok_embeddings(rows)
            plan = self._decoder_plan(x, cache, dense=n > self.PACKED_MAX_BLOCK)
            if plan is not None:  # every layer in one C call (CPU fp32)
                x = x.contiguous()
                plan.run(x, cos, sin, bits, cache.k, cache.v, start, current_threads())
            else:
                for i, layer in enumerate(self.layers):
                    k_cache, v_cache = cache.layer(i)
                    x = layer(x, cos, sin, k_cache, v_cache, start, bits)
            if last_n is not None:
                x = x[n - last_n :]
            logits = self.output(self.norm(x)).float()
            if self.vocab_ids is not None:  # back to the full vocabulary, -inf elsewhere
                full = logits.new_full((logits.shape[0], self.config.vocab_size), -math.inf)
                full[:, self.vocab_ids] = logits
                logits = full
            return logits
        except BaseException:
            cache.length = start
            raise
