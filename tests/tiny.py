"""Tiny random LLaMA families for tests: a target and drafts made as noisy copies of it, so
that acceptance is neither 0 nor 1."""

from __future__ import annotations

import torch

from pipespec_fast.models import hf_names
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.llama import LAYER_PARAMS, Transformer


def tiny_config(vocab: int = 64, dim: int = 32, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int = 2, tie: bool = False, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=dim // n_heads, intermediate_size=2 * dim,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
                       tie_word_embeddings=tie, eos_token_ids=[], **kw)


def random_hf_state(cfg: LlamaConfig, seed: int, std: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in cfg.expected_shapes().items():
        if name.endswith("norm.weight") or "layernorm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = std * torch.randn(shape, generator=g)
    return sd


def noisy_copy(sd: dict[str, torch.Tensor], noise: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def build(cfg: LlamaConfig, sd: dict[str, torch.Tensor], dtype=torch.float32) -> Transformer:
    m = Transformer(cfg)
    m.load_hf_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return m.to(dtype).eval()


def family(k: int, noise: float = 0.35, seed: int = 0, **cfg_kw) -> list[Transformer]:
    """k models sharing one vocab, smallest-noise (best) last: the last is the target."""
    cfg = tiny_config(**cfg_kw)
    target = random_hf_state(cfg, seed)
    models = [build(cfg, noisy_copy(target, noise * (k - 1 - i), seed + 100 + i))
              for i in range(k - 1)]
    return models + [build(cfg, target)]


def hf_state_of(model: Transformer) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face names (untied head), un-fusing QKV and gate/up
    (``LAYER_PARAMS``: each fused matrix is its parts stacked by rows)."""
    m, shapes = model, model.config.expected_shapes()
    sd = {hf_names.EMBED: m.tok_embeddings.weight, hf_names.FINAL_NORM: m.norm.weight,
          hf_names.HEAD: m.output.weight}
    for i, layer in enumerate(m.layers):
        for path, parts in LAYER_PARAMS.items():
            names = [hf_names.layer(i, p) for p in parts]
            w = layer.get_submodule(path).weight
            sd.update(zip(names, w.split([shapes[n][0] for n in names]), strict=True))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def subset_draft(model: Transformer, ids: list[int] | torch.Tensor,
                 shared_row: torch.Tensor | None = None) -> Transformer:
    """A vocabulary-subset copy of ``model`` (``LlamaConfig.vocab_subset``): the subset's rows
    of its embedding and head, plus ``shared_row`` (default: the mean of the other rows) as the
    embedding of every token outside the subset."""
    from dataclasses import replace

    from pipespec_fast.models.config import VOCAB_SUBSET_IDS

    ids = torch.as_tensor(ids, dtype=torch.int64)
    sd = hf_state_of(model)
    emb = sd[hf_names.EMBED]
    other = torch.ones(emb.shape[0], dtype=torch.bool)
    other[ids] = False
    shared = emb[other].mean(0) if shared_row is None else shared_row
    sd[hf_names.EMBED] = torch.cat([emb[ids], shared[None]])
    sd[hf_names.HEAD] = sd[hf_names.HEAD][ids]
    sd[VOCAB_SUBSET_IDS] = ids
    cfg = replace(model.config, vocab_subset=len(ids), tie_word_embeddings=False)
    m = Transformer(cfg)
    m.load_hf_state_dict(sd)
    return m.eval()


def write_tiny_checkpoint(path, model: Transformer, words: list[str]) -> None:
    """A tiny checkpoint folder with a word-level tokenizer over ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipespec_fast.models.checkpoint import save_state_dict

    save_state_dict(path, hf_state_of(model), model.config)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)
