"""servekit.engine: transformers models on the paged KV cache with continuous batching.

:class:`LLMEngine` (sync add_request / step / abort / generate) and :class:`AsyncEngine`
(anyio streams) over the scheduler, the KV cache manager, the model runner (servekit's paged
attention registered with transformers), the batched sampler and incremental detokenization.
"""

from servekit.engine.async_engine import AsyncEngine, EngineClosedError
from servekit.engine.attention import ATTENTION_NAME, AttentionMetadata
from servekit.engine.chat import ChatTemplateError, render_chat
from servekit.engine.config import EngineConfig
from servekit.engine.detokenize import IncrementalDetokenizer
from servekit.engine.engine import LLMEngine, StepTimes
from servekit.engine.outputs import GenerationResult, RequestOutput, TokenLogprob
from servekit.engine.runner import ModelRunner, Runner, UnsupportedModelError
from servekit.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from servekit.engine.stop import StopStringMatcher

__all__ = [
    "ATTENTION_NAME",
    "AsyncEngine",
    "AttentionMetadata",
    "ChatTemplateError",
    "EngineClosedError",
    "EngineConfig",
    "GenerationResult",
    "IncrementalDetokenizer",
    "LLMEngine",
    "ModelRunner",
    "RequestOutput",
    "Runner",
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "StepTimes",
    "StopStringMatcher",
    "TokenLogprob",
    "UnsupportedModelError",
    "render_chat",
]
