"""servekit.engine: transformers models on the paged KV cache with continuous batching.

:class:`LLMEngine` (sync add_request / step / abort / generate) and :class:`AsyncEngine`
(anyio streams) over the scheduler, the KV cache manager, the model runner (servekit's paged
attention registered with transformers), the batched sampler and incremental detokenization.
Needs ``servekit[engine]`` (torch, transformers, tokenizers; triton on Linux).
"""

from servekit._deprecation import moved_names
from servekit._optional import require

for _module in ("torch", "transformers", "tokenizers"):
    require(_module, "engine")
del _module

from servekit.engine.async_engine import AsyncEngine, EngineClosedError
from servekit.engine.chat import ChatTemplateError
from servekit.engine.config import EngineConfig
from servekit.engine.engine import LLMEngine, StepTimes
from servekit.engine.outputs import GenerationResult, RequestOutput, TokenLogprob
from servekit.engine.runner import ModelRunner, Runner, UnsupportedModelError
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
    "Runner",
    "Sampler",
    "StepTimes",
    "TokenLogprob",
    "UnsupportedModelError",
]


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "ATTENTION_NAME": "servekit.engine.attention",
    "AttentionMetadata": "servekit.engine.attention",
    "IncrementalDetokenizer": "servekit.engine.detokenize",
    "SamplerOutput": "servekit.engine.sampler",
    "SamplingBatch": "servekit.engine.sampler",
    "StopStringMatcher": "servekit.engine.stop",
    "render_chat": "servekit.engine.chat",
})
__getattr__ = _moved
