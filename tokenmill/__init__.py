"""tokenmill: a high-throughput, memory-efficient LLM inference and serving engine."""

from tokenmill.entrypoints.llm import LLM
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestOutputKind", "StructuredOutputsParams",
           "__version__"]
