"""``servekit gateway``: one stateless front for many replicas (extra ``gateway``).

It learns each replica's tokenizer, KV events and load (:mod:`servekit.server.replica_api`),
routes by the cache-aware policy (:mod:`servekit.route.cache_aware`), retries before the first
byte under a retry budget, fails over after it by resuming the stream elsewhere
(:mod:`servekit.gateway.failover`), keeps a circuit breaker per replica, and authenticates and
limits callers at the edge (:mod:`servekit.gateway.edge`), and traces each request with
OpenTelemetry when asked (:mod:`servekit.gateway.tracing`). No torch is imported.
Names are imported on first use, so ``servekit --help`` works without the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from servekit._optional import require

_EXPORTS = {
    "create_gateway": "servekit.gateway.app",
    "Edge": "servekit.gateway.edge",
    "StreamTracker": "servekit.gateway.failover",
    "Fleet": "servekit.gateway.fleet",
    "GatewayTracer": "servekit.gateway.tracing",
    "PromptEncoder": "servekit.gateway.tokens",
    "RetryBudget": "servekit.gateway.budget",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit.gateway' has no attribute {name!r}")
    require("httpx", "gateway")
    require("fastapi", "gateway")
    return getattr(importlib.import_module(module), name)
