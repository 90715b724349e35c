"""servekit: embeddable LLM-serving building blocks.

The public names of every part are re-exported here and imported lazily, so ``import
servekit`` stays cheap and a part that needs torch (or an extra) loads only when used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any

try:
    __version__ = importlib.metadata.version("servekit")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# public name -> the subpackage that exports it (loaded on first use).
_EXPORTS: dict[str, str] = {
    "ServekitError": "servekit.errors",
    "MissingExtraError": "servekit.errors",
    "KVCacheManager": "servekit.kv",
    "KVSequence": "servekit.kv",
    "BlockPool": "servekit.kv",
    "BlockStored": "servekit.kv",
    "BlockRemoved": "servekit.kv",
    "AllBlocksCleared": "servekit.kv",
    "KVCacheError": "servekit.kv",
    "OutOfBlocksError": "servekit.kv",
    "UnknownSequenceError": "servekit.kv",
    "hash_block": "servekit.kv",
    "KVCache": "servekit.engine.kv_cache",
    "paged_attention": "servekit.ops",
    "store_kv": "servekit.ops",
    "plan_attention": "servekit.ops",
    "AttentionPlan": "servekit.ops",
    "Scheduler": "servekit.sched",
    "SchedulerOutput": "servekit.sched",
    "UpdateResult": "servekit.sched",
    "Request": "servekit.sched",
    "RequestStatus": "servekit.sched",
    "FinishReason": "servekit.sched",
    "SamplingParams": "servekit.sched",
    "InvalidParameterError": "servekit.sched",
    "SchedulingPolicy": "servekit.sched",
    "FCFSPolicy": "servekit.sched",
    "PriorityPolicy": "servekit.sched",
    "FairSharePolicy": "servekit.sched",
    "QueueFullError": "servekit.sched",
    "LLMEngine": "servekit.engine",
    "AsyncEngine": "servekit.engine",
    "EngineConfig": "servekit.engine",
    "RequestOutput": "servekit.engine",
    "ModelRunner": "servekit.engine",
    "Sampler": "servekit.engine",
    "Limiter": "servekit.limit",
    "Limit": "servekit.limit",
    "Decision": "servekit.limit",
    "Reservation": "servekit.limit",
    "MemoryStore": "servekit.limit",
    "RedisStore": "servekit.limit",
    "RateLimitExceededError": "servekit.limit",
    "TokenBucket": "servekit.limit",
    "openai_headers": "servekit.limit",
    "HashRing": "servekit.route",
    "Router": "servekit.route",
    "HealthTracker": "servekit.route",
    "PrefixKey": "servekit.route",
    "RoutingPolicy": "servekit.route",
    "ConsistentHashPolicy": "servekit.route",
    "LeastLoadedPolicy": "servekit.route",
    "PowerOfTwoChoicesPolicy": "servekit.route",
    "RoundRobinPolicy": "servekit.route",
    "RouteError": "servekit.route",
    "Hook": "servekit.metrics",
    "HookSet": "servekit.metrics",
    "StatsHook": "servekit.metrics",
    "PrometheusHook": "servekit.metrics",
    "OtelHook": "servekit.metrics",
    "RequestLogHook": "servekit.metrics",
    "StepLogHook": "servekit.metrics",
    "create_app": "servekit.server",
    "ServerConfig": "servekit.server",
    "GenerationService": "servekit.server",
    "KeyStore": "servekit.server",
    "ApiKey": "servekit.server",
    "Client": "servekit.client",
    "AsyncClient": "servekit.client",
    "GrpcClient": "servekit.client",
    "AsyncGrpcClient": "servekit.client",
}

# Deprecated names (removed in the next release): old name -> (module, current name).
_DEPRECATED: dict[str, tuple[str, str]] = {
    "QueueFull": ("servekit.sched", "QueueFullError"),
    "RateLimitExceeded": ("servekit.limit", "RateLimitExceededError"),
    "FakeEngine": ("servekit.server.fake", "FakeEngine"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name not in _DEPRECATED:
            raise AttributeError(f"module 'servekit' has no attribute {name!r}")
        module, current = _DEPRECATED[name]
        warnings.warn(f"servekit.{name} is deprecated and goes in the next release: use "
                      f"{module}.{current}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), current)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
