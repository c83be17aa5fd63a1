"""Pipeline stages: the ``Stage`` protocol and its implementations."""

from pipespec_fast.stages.base import (
    Stage,
    StageCapabilities,
    check_order,
    check_stage,
    check_tree_drafter,
    is_model_free,
)
from pipespec_fast.stages.hf import HFStage
from pipespec_fast.stages.llama import LlamaStage
from pipespec_fast.stages.ngram import NGramStage
from pipespec_fast.stages.ngram_store import NGramStore

__all__ = ["HFStage", "LlamaStage", "NGramStage", "NGramStore", "Stage", "StageCapabilities",
           "check_order", "check_stage", "check_tree_drafter", "is_model_free"]
