"""LLaMA configuration, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
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
        check_values(self)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF ``config.json``; raises ``ValueError`` naming the field on
        other model types, missing fields or values out of range."""
        check_hf_dict(d)
        mtype = d.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mtype!r}: only {SUPPORTED_MODEL_TYPES}")
        n_heads = d["num_attention_heads"]
        dim = d["hidden_size"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if not isinstance(eos, list) else list(eos))
        theta, scaling = _rope_from_hf(d)
        return cls(
            vocab_size=d["vocab_size"],
            dim=dim,
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=_or_default(d, "num_key_value_heads", n_heads),
            head_dim=_or_default(d, "head_dim", dim // n_heads),
            intermediate_size=d["intermediate_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=_or_default(d, "rms_norm_eps", 1e-6),
            max_position_embeddings=_or_default(d, "max_position_embeddings", 2048),
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

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


REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size")
# our field -> the config.json name a user would look for
_HF_NAME = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
            "head_dim": "head_dim", "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings"}


def check_hf_dict(d: Any) -> None:
    """A parsed ``config.json`` is an object with every field the model cannot do without."""
    if not isinstance(d, dict):
        raise ValueError(f"must hold a JSON object, got a JSON {type(d).__name__}")
    missing = [k for k in REQUIRED_HF_FIELDS if d.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for hf in _HF_NAME.values():  # before any arithmetic on them (dim // heads)
        v = d.get(hf)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{hf} must be a positive integer, got {v!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{key} must be an object or null, got {d[key]!r}")


def _or_default(d: dict[str, Any], key: str, default: Any) -> Any:
    """``d[key]``, or ``default`` when absent or null (0 is a value, to be checked, not absent)."""
    v = d.get(key)
    return default if v is None else v


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_values(c: LlamaConfig) -> None:
    """Every value in range, or ``ValueError`` naming its ``config.json`` field: a zero head
    count divides by zero, a non-positive ``rope_theta`` or negative ``rms_norm_eps`` gives NaN
    or garbage logits without any other error."""
    for name, hf in _HF_NAME.items():
        v = getattr(c, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{hf} must be a positive integer, got {v!r}")
    real = (int, float)
    if isinstance(c.rope_theta, bool) or not isinstance(c.rope_theta, real) or \
            not math.isfinite(c.rope_theta) or c.rope_theta <= 0:
        raise ValueError(f"rope_theta must be a finite number > 0, got {c.rope_theta!r}")
    eps = c.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"rms_norm_eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(c.tie_word_embeddings, bool):
        raise ValueError(f"tie_word_embeddings must be true or false, got "
                         f"{c.tie_word_embeddings!r}")
    for name, ids in (("bos_token_id", [] if c.bos_token_id is None else [c.bos_token_id]),
                      ("eos_token_id", c.eos_token_ids)):
        if not all(_is_int(i) and 0 <= i < c.vocab_size for i in ids):
            raise ValueError(f"{name} must be token ids in [0, vocab_size={c.vocab_size}), "
                             f"got {ids!r}")
    _check_rope_scaling(c.rope_scaling)
    _check_shape_rules(c)


def _check_shape_rules(c: LlamaConfig) -> None:
    v = c.vocab_subset
    if v is not None and not _is_int(v):
        raise ValueError(f"vocab_subset_size must be an integer, got {v!r}")
    if v is not None and not 0 < v <= c.vocab_size:
        raise ValueError(f"vocab_subset_size must be in [1, vocab_size={c.vocab_size}], "
                         f"got {v}")
    if c.n_heads % c.n_kv_heads:
        raise ValueError(f"num_attention_heads ({c.n_heads}) must be a multiple of "
                         f"num_key_value_heads ({c.n_kv_heads})")
    if c.rope_scaling is not None:
        kind = c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
        if kind not in ("llama3", "default", None):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3 or none)")


def _check_rope_scaling(s: dict[str, Any] | None) -> None:
    if s is None:
        return
    if not isinstance(s, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {s!r}")
    if s.get("rope_type", s.get("type")) != "llama3":
        return  # other kinds are refused by name in LlamaConfig.__post_init__
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or \
                v <= 0:
            raise ValueError(f"rope_scaling.{key} must be a finite number > 0, got {v!r}")
    if s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ValueError("rope_scaling: high_freq_factor must exceed low_freq_factor")


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of an HF config dict: transformers >= 5 nests both under
    ``rope_parameters``; a scaling of type ``default`` (or none) is no scaling."""
    scaling = d.get("rope_scaling") or d.get("rope_parameters")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("default", None):
        scaling = None
    theta = d.get("rope_theta")
    if theta is None:
        theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if isinstance(theta, int | float) and not isinstance(theta, bool):
        theta = float(theta)  # anything else is refused by name in check_values
    return theta, scaling


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
