"""A vocabulary-subset checkpoint (``LlamaConfig.vocab_subset``) as a transformers model.

transformers has no notion of a vocabulary subset, so the model is assembled from our loader:
the embedding is expanded to the full vocabulary (tokens outside the subset share its extra
row) and the head is replaced by one that scatters the subset's logits into a full-vocabulary
row of ``-inf``. The result is an ordinary ``LlamaForCausalLM`` for ``generate()`` and for
``assistant_model=`` in assisted generation, with the same logits as our ``Transformer``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipespec_fast.models import hf_names
from pipespec_fast.models.checkpoint import load_checkpoint
from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig
from pipespec_fast.models.llama import vocab_subset_rows


class SubsetHead(nn.Module):
    """``[..., dim] -> [..., vocab]`` logits: the subset's rows, ``-inf`` elsewhere."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("ids", ids)
        self.vocab_size = vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sub = h @ self.weight.T
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.ids] = sub
        return out


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``transformers.LlamaForCausalLM`` for any of our checkpoints, subset or not."""
    import transformers

    if LlamaConfig.from_dir(model_dir).vocab_subset is None:
        return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    cfg, sd = load_checkpoint(model_dir, dtype=dtype)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg.pop("vocab_subset_size")
    hf_cfg["tie_word_embeddings"] = False
    config = transformers.LlamaConfig(**hf_cfg)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    ids = sd.pop(VOCAB_SUBSET_IDS)
    emb = sd[hf_names.EMBED]
    head = sd.pop(hf_names.HEAD, None)
    if head is None:
        head = emb[: cfg.vocab_subset]
    sd[hf_names.EMBED] = emb[vocab_subset_rows(ids, cfg.vocab_size)].contiguous()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(missing) - {hf_names.HEAD}:
        raise ValueError(f"{model_dir}: tensors do not fit transformers' LlamaForCausalLM "
                         f"(missing {missing}, unexpected {unexpected})")
    model.lm_head = SubsetHead(head.clone(), ids, cfg.vocab_size)
    rotary = type(model.model.rotary_emb)(config=config)  # fp32 inv_freq, off the meta device
    model.model.rotary_emb = None
    model = model.to(dtype)
    model.model.rotary_emb = rotary
    return model.eval()
