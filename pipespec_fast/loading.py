"""Loading a hierarchy of checkpoints as pipeline stages that share one tokenizer
(``FastPipeline.from_pretrained``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipespec_fast.stages import LlamaStage, NGramStage, Stage


def load_stages(paths: Sequence[str | Path], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32,
                devices: Sequence[str | torch.device] | None = None, max_len: int = 2048,
                ngram: bool = False) -> tuple[list[Stage], object | None]:
    """LLaMA checkpoints (HF layout), smallest first, as ``LlamaStage`` s, and the target's
    tokenizer (``None`` when the directories hold none).

    Every stage must share the target's tokenizer: a different vocabulary is refused with a
    ``ValueError`` that names both stages, before any weights load. ``ngram=True`` puts a
    model-free prompt-lookup drafter (``NGramStage``) below the models as stage 0, on the
    CPU whatever the models' device: its work is host-side lookups, and its proposals on a GPU
    would cost uploads and host reads (three syncs per token) for nothing.
    """
    if not paths:
        raise ValueError("paths: at least one model directory is required")
    devices = list(devices) if devices is not None else [device] * len(paths)
    if len(devices) != len(paths):
        raise ValueError(f"devices: {len(devices)} given for {len(paths)} stages")
    tokenizers = [load_tokenizer(p) for p in paths]
    names = [Path(p).name for p in paths]
    tok = tokenizers[-1]
    for name, t in zip(names[:-1], tokenizers[:-1], strict=True):
        if (t is None) != (tok is None) or (t is not None and t.get_vocab() != tok.get_vocab()):
            raise ValueError(
                f"tokenizer vocab mismatch between stage {name!r} and target {names[-1]!r}: "
                "all stages must share one tokenizer"
            )
    stages: list[Stage] = [
        LlamaStage.from_pretrained(p, dtype=dtype, device=d, max_len=max_len, name=n)
        for p, d, n in zip(paths, devices, names, strict=True)
    ]
    if ngram:
        t = stages[-1]
        stages.insert(0, NGramStage(t.vocab_size, max_len=t.max_len, device="cpu"))
    return stages, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    """The ``transformers`` tokenizer saved in ``path``, or ``None`` if there is none.

    Code shipped in the folder is never run (``trust_remote_code=False``: transformers would
    otherwise ask on stdin whether to run an ``auto_map``'s module). Any failure is one
    ``ValueError`` line naming the folder and the first line of the cause."""
    p = Path(path)
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        return None
    _refuse_remote_code(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds, several lines each
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {first})") \
            from None


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
