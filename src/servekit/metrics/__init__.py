"""Observability: events, hooks, in-process stats and exporters.

``PrometheusHook`` and ``OtelHook`` import their libraries only when built, so this package
imports without the ``prometheus`` and ``otel`` extras. Every event type (and the gauge names)
is in :mod:`servekit.metrics.events`, the hook protocol in :mod:`servekit.metrics.hooks`: the
bottom layer, which every other part imports.
"""

from servekit._deprecation import moved_names
from servekit.metrics.errors import MetricsConfigError
from servekit.metrics.events import EngineStep, RequestFinished
from servekit.metrics.hooks import Hook, HookSet
from servekit.metrics.logs import RequestLogHook, StepLogHook
from servekit.metrics.otel import OtelHook
from servekit.metrics.prometheus import PrometheusHook
from servekit.metrics.stats import Histogram, StatsHook

__all__ = [
    "EngineStep",
    "Histogram",
    "Hook",
    "HookSet",
    "MetricsConfigError",
    "OtelHook",
    "PrometheusHook",
    "RequestFinished",
    "RequestLogHook",
    "StatsHook",
    "StepLogHook",
]


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "CacheStats": "servekit.metrics.events",
    "EVENT_METHODS": "servekit.metrics.hooks",
    "FirstToken": "servekit.metrics.events",
    "KV_BLOCKS_IN_USE": "servekit.metrics.events",
    "NewTokens": "servekit.metrics.events",
    "OPEN_STREAMS": "servekit.metrics.events",
    "RATE_LIMIT_RESERVATIONS": "servekit.metrics.events",
    "RateLimitDecision": "servekit.metrics.events",
    "RequestPreempted": "servekit.metrics.events",
    "RequestQueued": "servekit.metrics.events",
    "RequestScheduled": "servekit.metrics.events",
    "ResourceGauge": "servekit.metrics.events",
    "RouteDecision": "servekit.metrics.events",
    "request_record": "servekit.metrics.logs",
})
__getattr__ = _moved
