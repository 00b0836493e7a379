"""Engine: prefill/decode over a MoETransformer, sampling, stop handling, streaming, routing traces."""

from hybrimoe.engine.batch import BatchEngine, BatchEvent
from hybrimoe.engine.engine import Engine, PromptError
from hybrimoe.engine.options import EngineOptions
from hybrimoe.engine.recorder import RoutingRecorder, header_for
from hybrimoe.engine.types import GenerationResult, SamplingParams, StreamChunk

__all__ = ["BatchEngine", "BatchEvent", "Engine", "GenerationResult", "PromptError", "RoutingRecorder", "EngineOptions",
           "SamplingParams", "StreamChunk", "header_for"]
