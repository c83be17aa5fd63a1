"""LLaMA configuration, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipespec_fast.models import hf_names
from pipespec_fast.models.hf_names import VOCAB_SUBSET_IDS

__all__ = ["SUPPORTED_MODEL_TYPES", "VOCAB_SUBSET_IDS", "LlamaConfig", "subset_ids_problem"]

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass
class LlamaConfig:
    """The hyper-parameters a LLaMA forward needs (names follow gpt-fast, not HF)."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # A draft's reduced vocabulary: the model embeds and predicts only ``vocab_subset`` token
    # ids (``model.vocab_subset_ids``, ascending); every other input token shares one extra
    # embedding row and every other output token gets logit -inf. ``None``: the full vocabulary.
    vocab_subset: int | None = None

    def __post_init__(self) -> None:
        v = self.vocab_subset
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"vocab_subset_size must be an integer, got {v!r}")
        if v is not None and not 0 < v <= self.vocab_size:
            raise ValueError(
                f"vocab_subset_size must be in [1, vocab_size={self.vocab_size}], "
                f"got {self.vocab_subset}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3 or none)")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF ``config.json``; raises ``ValueError`` on other model types."""
        mtype = d.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mtype!r}: only {SUPPORTED_MODEL_TYPES}")
        n_heads = d["num_attention_heads"]
        dim = d["hidden_size"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        theta, scaling = _rope_from_hf(d)
        return cls(
            vocab_size=d["vocab_size"],
            dim=dim,
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or dim // n_heads,
            intermediate_size=d["intermediate_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            vocab_subset=d.get("vocab_subset_size"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LlamaConfig:
        """Read ``model_dir/config.json``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` form (what the converter and the tests write)."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.vocab_subset is not None:
            d["vocab_subset_size"] = self.vocab_subset
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids
            )
        return d

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding table: the vocabulary, or the subset plus one shared row."""
        return self.vocab_size if self.vocab_subset is None else self.vocab_subset + 1

    @property
    def head_rows(self) -> int:
        """Rows of the output head: the vocabulary or the subset."""
        return self.vocab_size if self.vocab_subset is None else self.vocab_subset

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF checkpoint layout with its shape (no lm_head when tied).

        With a vocabulary subset, ``model.vocab_subset_ids`` (integer) lists its token ids."""
        shapes: dict[str, tuple[int, ...]] = {
            hf_names.EMBED: (self.embedding_rows, self.dim),
            hf_names.FINAL_NORM: (self.dim,),
        }
        if self.vocab_subset is not None:
            shapes[VOCAB_SUBSET_IDS] = (self.vocab_subset,)
        if not self.tie_word_embeddings:
            shapes[hf_names.HEAD] = (self.head_rows, self.dim)
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        dim, inter = self.dim, self.intermediate_size
        per_layer = {  # in the order of hf_names.LAYER_TENSORS
            hf_names.ATTN_NORM: (dim,), hf_names.FFN_NORM: (dim,),
            hf_names.Q: (q_out, dim), hf_names.K: (kv_out, dim), hf_names.V: (kv_out, dim),
            hf_names.O: (dim, q_out), hf_names.GATE: (inter, dim), hf_names.UP: (inter, dim),
            hf_names.DOWN: (dim, inter),
        }
        for i in range(self.n_layers):
            shapes.update((hf_names.layer(i, name), shape) for name, shape in per_layer.items())
        return shapes


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of an HF config dict: transformers >= 5 nests both under
    ``rope_parameters``; a scaling of type ``default`` (or none) is no scaling."""
    scaling = d.get("rope_scaling") or d.get("rope_parameters")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("default", None):
        scaling = None
    theta = d.get("rope_theta")
    if theta is None:
        theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return float(theta), scaling


def subset_ids_problem(ids, config: LlamaConfig) -> str:
    """What is wrong with ``ids`` (a 1-D integer tensor) as ``config``'s vocabulary subset:
    their number, range or order (``""``: nothing). The model and the checkpoint loader each
    raise it in their own error type."""
    if ids.numel() != config.vocab_subset:
        return f"{ids.numel()} ids for vocab_subset={config.vocab_subset}"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        return f"ids outside [0, vocab_size={config.vocab_size})"
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        return "ids not strictly ascending"
    return ""
