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
    model-free prompt-lookup drafter (``NGramStage``) below the models as stage 0.
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
        stages.insert(0, NGramStage(t.vocab_size, max_len=t.max_len, device=t.device))
    return stages, tok


def load_tokenizer(path: str | Path):
    """The ``transformers`` tokenizer saved in ``path``, or ``None`` if there is none."""
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                          "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))
