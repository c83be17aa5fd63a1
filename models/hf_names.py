"""The Hugging Face LLaMA tensor names, spelled out once.

A model directory is read and written in ``transformers``' ``LlamaForCausalLM`` layout so that
a checkpoint converted or trained here loads there and the other way round. Every module that
names a tensor of that layout takes the name from here: the config's expected shapes
(``config.py``), the checkpoint checks (``checkpoint.py``), the model's fused parameters
(``llama.py``) and packed weights (``packed.py``), the GGUF converter, and the draft-training
tools. A per-layer name is a suffix; :func:`layer` puts a layer's prefix in front of it.
"""

from __future__ import annotations

import re

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"  # absent when the head is tied to EMBED
# Not transformers': a draft's vocabulary subset (``LlamaConfig.vocab_subset``), ascending
# token ids, an integer tensor.
VOCAB_SUBSET_IDS = "model.vocab_subset_ids"

# Per-layer tensors (suffixes of ``model.layers.{i}.``).
ATTN_NORM = "input_layernorm.weight"
FFN_NORM = "post_attention_layernorm.weight"
Q = "self_attn.q_proj.weight"
K = "self_attn.k_proj.weight"
V = "self_attn.v_proj.weight"
O = "self_attn.o_proj.weight"
GATE = "mlp.gate_proj.weight"
UP = "mlp.up_proj.weight"
DOWN = "mlp.down_proj.weight"
LAYER_TENSORS = (ATTN_NORM, FFN_NORM, Q, K, V, O, GATE, UP, DOWN)  # the order files list them

# Buffers some exporters store that a forward recomputes: accepted in a checkpoint, dropped.
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def layer(i: int, name: str) -> str:
    """The full name of per-layer tensor ``name`` (e.g. :data:`Q`) of layer ``i``."""
    return f"model.layers.{i}.{name}"
