"""pipespec-fast: hierarchical pipelined speculative decoding (PipeSpec) with Triton kernels."""

from pipespec_fast.ngram import NGramStage
from pipespec_fast.pipeline import FastPipeline, GenerationResult, StageError
from pipespec_fast.sequencer import SamplingParams
from pipespec_fast.stage import HFStage, LlamaStage, Stage

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
