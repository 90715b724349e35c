"""servekit.engine: transformers models on the paged KV cache with continuous batching.

:class:`LLMEngine` (sync add_request / step / abort / generate) and :class:`AsyncEngine`
(anyio streams) over the scheduler, the KV cache manager, the model runner (servekit's paged
attention registered with transformers), the batched sampler and incremental detokenization.
Needs ``servekit[engine]`` (torch, transformers, tokenizers; triton on Linux).
"""

from servekit._optional import require

for _module in ("torch", "transformers", "tokenizers"):
    require(_module, "engine")
del _module

from servekit.engine.async_engine import AsyncEngine, EngineClosedError
from servekit.engine.chat import ChatTemplateError
from servekit.engine.config import EngineConfig
from servekit.engine.engine import LLMEngine, StepTimes
from servekit.engine.outputs import GenerationResult, RequestOutput, TokenLogprob
from servekit.engine.runner import ModelRunner, UnsupportedModelError
from servekit.engine.sampler import Sampler

__all__ = [
    "AsyncEngine",
    "ChatTemplateError",
    "EngineClosedError",
    "EngineConfig",
    "GenerationResult",
    "LLMEngine",
    "ModelRunner",
    "RequestOutput",
    "Sampler",
    "StepTimes",
    "TokenLogprob",
    "UnsupportedModelError",
]
