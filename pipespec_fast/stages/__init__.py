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

__all__ = ["HFStage", "LlamaStage", "NGramStage", "Stage", "StageCapabilities", "check_order",
           "check_stage", "check_tree_drafter", "is_model_free"]
