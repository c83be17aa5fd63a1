"""Loading a hierarchy of checkpoints as pipeline stages that share one tokenizer
(``FastPipeline.from_pretrained``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipespec_fast import config
from pipespec_fast.models.feature_head import FeatureHead, is_feature_head
from pipespec_fast.stages import LlamaStage, NGramStage, Stage
from pipespec_fast.stages.feature_head import FeatureHeadStage
from pipespec_fast.stages.ngram_store import NGramStore


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The weights' and KV cache's dtype when none is asked for: ``bfloat16`` on CUDA,
    ``float32`` elsewhere. On a GPU fp32 has no tensor cores and twice the bytes per weight
    and cached key (a forward and verify attention are bound by those bytes), and the Triton
    attention kernel spills registers in fp32; bf16 keeps fp32's exponent range, so logits do
    not overflow where fp16 could. On the CPU the C kernels and the exact compute mode are
    fp32 (greedy equality with transformers is defined there). A pure function of the device
    string, so the choice is tested without a GPU. Pre-Ampere GPUs (no bf16 tensor cores):
    ask for ``float16``."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_stages(paths: Sequence[str | Path], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None,
                devices: Sequence[str | torch.device] | None = None, max_len: int = 2048,
                ngram: bool = False, ngram_store: str | Path | NGramStore | None = None
                ) -> tuple[list[Stage], object | None]:
    """LLaMA checkpoints (HF layout), smallest first, as ``LlamaStage`` s, and the target's
    tokenizer (``None`` when the directories hold none).

    Every stage must share the target's tokenizer: a different vocabulary is refused with a
    ``ValueError`` that names both stages, before any weights load. ``ngram=True`` puts a
    model-free prompt-lookup drafter (``NGramStage``) below the models as stage 0, on the
    CPU whatever the models' device: its work is host-side lookups, and its proposals on a GPU
    would cost uploads and host reads (three syncs per token) for nothing; ``ngram_store``
    gives it a store of the target's answers (:func:`load_store`, read before any model).
    ``dtype`` ``None``: each stage gets :func:`default_dtype` of its own device.
    """
    if not paths:
        raise ValueError("paths: at least one model directory is required")
    devices = list(devices) if devices is not None else [device] * len(paths)
    if len(devices) != len(paths):
        raise ValueError(f"devices: {len(devices)} given for {len(paths)} stages")
    tok = check_tokenizers(paths)
    store = load_store(ngram_store, paths[-1], ngram, tok)
    names = [Path(p).name for p in paths]
    heads = [is_feature_head(p) for p in paths]
    _check_heads(paths, heads, devices)
    stages: list[Stage] = [
        LlamaStage.from_pretrained(p, dtype=default_dtype(d) if dtype is None else dtype,
                                   device=d, max_len=max_len, name=n)
        for p, d, n, h in zip(paths, devices, names, heads, strict=True) if not h
    ]
    if heads[-2:-1] == [True]:  # a feature head, right below the target it reads
        stages.insert(len(stages) - 1, feature_head_stage(paths[-2], stages[-1]))
    if ngram:
        t = stages[-1]
        stages.insert(0, NGramStage(t.vocab_size, max_len=t.max_len, device="cpu",
                                    store=store))
    return stages, tok


def feature_head_stage(path: str | Path, target: LlamaStage) -> FeatureHeadStage:
    """The feature head in ``path`` (``models/feature_head.py``) as the stage below ``target``,
    whose features it reads (the target keeps them from now on), computing as the target
    does now (a draft's Q8_0 blocks under int8: ``models.packed.requantize_fp16``)."""
    from pipespec_fast.models.packed import requantize_fp16, set_compute

    head = FeatureHead.from_pretrained(path, target.model)
    if target.model.compute == "int8":
        requantize_fp16(head.body)
    set_compute(head.body, target.model.compute)
    return FeatureHeadStage(head, target, name=Path(path).name)


def _check_heads(paths, heads: list[bool], devices) -> None:
    """A feature head (``models/feature_head.py``) sits right below the target, and both run
    on the CPU (the head reads the target's features in host memory)."""
    for i, (p, h) in enumerate(zip(paths, heads, strict=True)):
        if h and i != len(paths) - 2:
            raise ValueError(f"paths: {p} is a feature head: it goes right below the target "
                             "(second to last), whose features it reads")
        if h and {torch.device(devices[i]).type, torch.device(devices[-1]).type} != {"cpu"}:
            raise ValueError(f"devices: the feature head {p} and its target run on the CPU "
                             "(it reads the target's features in host memory)")


def load_store(store: str | Path | NGramStore | None, target_dir: str | Path | None,
               ngram: bool = True, tokenizer=None) -> NGramStore | None:
    """``store`` as an :class:`~pipespec_fast.stages.ngram_store.NGramStore` for the target in
    ``target_dir``: ``None``, a store, or the folder of a saved one. Checked before any model
    loads, each mismatch a ``ValueError`` naming the store: its vocabulary size against the
    target folder's ``config.json`` (where the folder is at hand), and the vocabulary it was
    made with (``vocab_sha256``, :func:`~pipespec_fast.stages.ngram_store.vocab_fingerprint`)
    against ``tokenizer``'s, where both exist. ``ngram=False`` with a store is refused: only
    the n-gram drafter reads it."""
    import json

    from pipespec_fast.stages.ngram_store import NGramStore, vocab_fingerprint

    if store is None:
        return None
    if not ngram:
        raise ValueError("ngram_store: only the n-gram drafter uses it (pass ngram=True)")
    if not isinstance(store, (str, Path, NGramStore)):
        raise TypeError(f"ngram_store: a folder or an NGramStore, got {type(store).__name__}")
    loaded = store if isinstance(store, NGramStore) else \
        NGramStore.load(store, config.current().cache_dir / "ngram")
    name = "the store" if isinstance(store, NGramStore) else str(store)
    cfg = Path(target_dir) / "config.json" if target_dir is not None else None
    if cfg is not None and cfg.is_file():
        try:
            vocab = json.loads(cfg.read_text()).get("vocab_size")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            vocab = None  # the model's own loading reports a broken config.json
        if isinstance(vocab, int) and vocab != loaded.vocab_size:
            raise ValueError(f"ngram_store: {name} holds ids of a {loaded.vocab_size}-token "
                             f"vocabulary; the target ({target_dir}) has {vocab}")
    want = loaded.meta.get("vocab_sha256")
    if want and tokenizer is not None and vocab_fingerprint(tokenizer.get_vocab()) != want:
        raise ValueError(f"ngram_store: {name} was made with another vocabulary than the "
                         "target's tokenizer")
    return loaded


def check_tokenizers(paths: Sequence[str | Path]):
    """The target's (last path's) tokenizer, after checking that every folder holds the same
    vocabulary (or that none holds a tokenizer): a ``ValueError`` names both stages. Folders
    with byte-identical tokenizer files share one object (:func:`load_tokenizers`)."""
    names = [Path(p).name for p in paths]
    tokenizers = load_tokenizers(paths)
    tok = tokenizers[-1]
    for name, t in zip(names[:-1], tokenizers[:-1], strict=True):
        if t is tok:
            continue  # the same files: one object, the same vocabulary
        if (t is None) != (tok is None) or (t is not None and t.get_vocab() != tok.get_vocab()):
            raise ValueError(
                f"tokenizer vocab mismatch between stage {name!r} and target {names[-1]!r}: "
                "all stages must share one tokenizer"
            )
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# every file a tokenizer is built from (transformers' and ours); two folders whose files are
# byte for byte the same make the same tokenizer
_DEFINING_FILES = TOKENIZER_FILES + (
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def load_tokenizers(paths: Sequence[str | Path]) -> list:
    """The tokenizer of each folder, loaded once per distinct content: folders whose tokenizer
    files are identical (compared by SHA-256 of their bytes, never by name) get the same
    object. Saves a second load (~13 MB and its time) when draft and target ship one
    tokenizer, as the default hierarchy does."""
    loaded: dict[str, object] = {}
    out = []
    for p in paths:
        key = tokenizer_key(p)
        if key is None:
            out.append(None)
            continue
        if key not in loaded:
            loaded[key] = load_tokenizer(p)
        out.append(loaded[key])
    return out


def tokenizer_key(path: str | Path) -> str | None:
    """A digest of everything ``load_tokenizer(path)`` reads (``None``: no tokenizer): the
    names and bytes of the tokenizer files, and of the model's ``config.json`` when no
    ``tokenizer_config.json`` names the class (transformers then picks it by model type)."""
    import hashlib

    p = Path(path)
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        return None
    h = hashlib.sha256()
    files = [f for f in _DEFINING_FILES if (p / f).is_file()]
    extra = p / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(str(f.relative_to(p)) for f in extra.rglob("*") if f.is_file())
    if not _names_class(p / "tokenizer_config.json"):
        files.append("config.json")
    for f in files:
        data = (p / f).read_bytes() if (p / f).is_file() else b""
        h.update(f"{f}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _names_class(cfg: Path) -> bool:
    import json

    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and bool(d.get("tokenizer_class"))


def load_tokenizer(path: str | Path):
    """The tokenizer saved in ``path``, or ``None`` if there is none: a
    :class:`~pipespec_fast.tokenizer.FastTokenizer` (``tokenizers`` alone, ~90 MB less than
    importing ``transformers``) where its configuration allows the same results
    (:func:`~pipespec_fast.tokenizer.light_problem`), else the ``transformers`` tokenizer.

    Code shipped in the folder is never run (``trust_remote_code=False``: transformers would
    otherwise ask on stdin whether to run an ``auto_map``'s module). Any failure is one
    ``ValueError`` line naming the folder and the first line of the cause."""
    from pipespec_fast.tokenizer import FastTokenizer, light_problem

    p = Path(path)
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        return None
    _refuse_remote_code(p)
    if light_problem(p) is None:
        try:
            return FastTokenizer.from_folder(p)
        except Exception as e:  # the Rust parser's errors, a template file unreadable
            raise _load_error(p, e) from None
    return load_transformers_tokenizer(p)


def load_transformers_tokenizer(path: str | Path):
    """``transformers``' ``AutoTokenizer`` for ``path`` (the checks of :func:`load_tokenizer`
    apply: no remote code, one-line errors)."""
    p = Path(path)
    _refuse_remote_code(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds, several lines each
        raise _load_error(p, e) from None


def _load_error(p: Path, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ValueError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {first})")


def _refuse_remote_code(p: Path) -> None:
    """A tokenizer config naming code to import (``auto_map``) is refused up front."""
    import json

    cfg = p / "tokenizer_config.json"
    if not cfg.is_file():
        return
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if isinstance(d, dict) and d.get("auto_map"):
        raise ValueError(f"{cfg}: asks to run code from the model folder (auto_map); "
                         "pipespec-fast never runs code from a model folder")
