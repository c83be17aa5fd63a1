"""pipespec-fast: hierarchical pipelined speculative decoding (PipeSpec) with Triton kernels."""

from pipespec_fast.api import FastPipeline, GenerationResult, StageError
from pipespec_fast.decoding.sequence import SamplingParams
from pipespec_fast.stages import HFStage, LlamaStage, NGramStage, Stage

__all__ = [
    "FastPipeline",
    "GenerationResult",
    "HFStage",
    "LlamaStage",
    "NGramStage",
    "SamplingParams",
    "Stage",
    "StageError",
]
__version__ = "0.1.0"
