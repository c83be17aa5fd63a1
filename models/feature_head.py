"""A feature head: a one-layer draft that reads the target's own last hidden states (the
EAGLE idea), so it predicts the target's next token from what the target already computed.

Why: a small stand-alone draft sees only tokens. On a 135M target, a distilled 3-layer draft
agreed with the target's greedy token 32% of the time on MT-Bench prompts; the target's hidden
state at position ``p - 1`` already holds most of what decides the token at ``p + 1``.

The head at position ``p`` takes the token there, ``t_p``, and the target's feature at
``p - 1``, ``g_{p-1}`` (the last layer's output after the final norm: what the LM head reads),
and returns its estimate ``ĝ_p`` of the target's feature at ``p``; the target's own LM head on
``ĝ_p`` gives the draft for ``t_{p+1}``::

    z_p = fc([embed(t_p); g_{p-1}])          fc: [2 dim] -> [dim], with bias
    x_p = Block(z_p)                         one LLaMA layer, its own KV cache
    ĝ_p = norm(x_p);  logits_p = E ĝ_p        the target's final norm and (tied) embedding

Beyond what the target has verified there is no ``g_{p-1}`` yet: the head feeds its own
``ĝ_{p-1}`` instead (``stages/feature_head.py`` keeps track of which rows were which and
recomputes them once the target's own arrive).

On disk a head is a folder with a one-layer LLaMA checkpoint (``model.safetensors``,
``config.json`` with ``"feature_head"``: its layer, the target's final norm, the rows of the
target's embedding its vocabulary subset predicts) and :data:`FC_FILE`, the input projection.
Made by ``tools/train_feature_head.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pipespec_fast.models.llama import Transformer, block_layout, rope_tables

FC_FILE = "feature_head.safetensors"
CONFIG_KEY = "feature_head"  # config.json: {"target": its name, "features": what it reads}


def is_feature_head(model_dir: str | Path) -> bool:
    """The folder holds a feature head (its ``config.json`` says so)."""
    path = Path(model_dir) / "config.json"
    try:
        return CONFIG_KEY in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


class FeatureHead:
    """A one-layer body (a :class:`Transformer` whose vocabulary is a subset of the target's)
    with the input projection ``fc``; ``embed`` looks up the target's embedding rows of any
    token (the body's own rows cover its subset only)."""

    def __init__(self, body: Transformer, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                 embed) -> None:
        dim = body.config.dim
        if body.config.n_layers != 1:
            raise ValueError(f"feature head: one layer expected, got {body.config.n_layers}")
        if tuple(fc_weight.shape) != (dim, 2 * dim) or tuple(fc_bias.shape) != (dim,):
            raise ValueError(f"feature head: fc must be [{dim}, {2 * dim}] and [{dim}], got "
                             f"{tuple(fc_weight.shape)} and {tuple(fc_bias.shape)}")
        self.body = body
        self.config = body.config
        self.fc_weight = fc_weight.float().contiguous()
        self.fc_bias = fc_bias.float().contiguous()
        self.embed = embed

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, target: Transformer) -> FeatureHead:
        """Load the head in ``model_dir`` for ``target`` (``ValueError`` naming the file when
        the two do not fit: another width or vocabulary)."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        body = Transformer.from_pretrained(model_dir)
        tc, hc = target.config, body.config
        if (hc.dim, hc.vocab_size) != (tc.dim, tc.vocab_size):
            raise ValueError(f"{model_dir / 'config.json'}: a feature head of width {hc.dim} "
                             f"over {hc.vocab_size} tokens, the target has {tc.dim} and "
                             f"{tc.vocab_size}")
        fc_path = model_dir / FC_FILE
        if not fc_path.is_file():
            raise FileNotFoundError(f"{fc_path}: a feature head needs its input projection")
        fc = load_file(str(fc_path))
        missing = {"fc.weight", "fc.bias"} - set(fc)
        if missing:
            raise ValueError(f"{fc_path}: missing {sorted(missing)}")
        try:
            return cls(body, fc["fc.weight"], fc["fc.bias"], target.tok_embeddings)
        except ValueError as e:
            raise ValueError(f"{model_dir}: {e}") from None

    def new_cache(self, max_len: int):
        return self.body.new_cache(max_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, cache, last_n: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``tokens: [n]`` at slots ``[cache.length, + n)`` with ``feats: [n, dim]`` (row
        ``i``: the target's normalised feature at the position before token ``i``, or the
        head's own estimate of it). Returns ``([last_n, vocab_size]`` fp32 logits (none
        computed for ``last_n = 0``), ``[n, dim]`` the head's feature estimates ``ĝ``)."""
        body = self.body
        n = tokens.shape[0]
        start = cache.reserve(n)
        try:
            bits, pos = block_layout(n, start, None, tokens.device, body._chain_bits)
            cos, sin = rope_tables(pos, body.inv_freq, body.norm.weight.dtype)
            z = F.linear(torch.cat([self.embed(tokens).float(), feats.float()], -1),
                         self.fc_weight, self.fc_bias)
            x = body._layers(z.contiguous(), cos, sin, bits, cache, start)
            g = body.norm(x)
            if last_n == 0:
                return x.new_empty(0, self.config.vocab_size), g
            return body.head(x[n - last_n:]), g
        except BaseException:
            cache.length = start
            raise

