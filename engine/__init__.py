"""paged-engine: a vLLM-style inference engine."""
from engine.core.startup import STARTUP  # noqa: F401  (first: start-up phases are timed from here)
from engine.config import EngineArgs
from engine.entrypoints.llm import LLM
from engine.outputs import CompletionOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from engine.pooling.params import PoolingParams
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineArgs", "PoolingParams",
           "EmbeddingRequestOutput"]
__version__ = "0.1.0"
