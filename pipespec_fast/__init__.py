"""pipespec-fast: hierarchical pipelined speculative decoding (PipeSpec) with Triton kernels."""

from pipespec_fast.api import FastPipeline, GenerationResult
from pipespec_fast.config import RuntimeConfig
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.errors import (
    GenerationTimeout,
    NonFiniteLogitsError,
    PipelineClosedError,
    StageError,
)
from pipespec_fast.stages import (
    HFStage,
    LlamaStage,
    NGramStage,
    NGramStore,
    Stage,
    StageCapabilities,
)

__all__ = [
    "FastPipeline",
    "GenerationResult",
    "GenerationTimeout",
    "HFStage",
    "LlamaStage",
    "NGramStage",
    "NGramStore",
    "NonFiniteLogitsError",
    "PipelineClosedError",
    "RuntimeConfig",
    "SamplingParams",
    "Stage",
    "StageCapabilities",
    "StageError",
]
__version__ = "0.1.0"
