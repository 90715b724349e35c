"""Observability: events, hooks, in-process stats and exporters.

``PrometheusHook`` and ``OtelHook`` import their libraries only when built, so this package
imports without the ``prometheus`` and ``otel`` extras.
"""

from servekit.metrics.errors import MetricsConfigError
from servekit.metrics.events import (
    KV_BLOCKS_IN_USE,
    OPEN_STREAMS,
    RATE_LIMIT_RESERVATIONS,
    CacheStats,
    EngineStep,
    FirstToken,
    NewTokens,
    RateLimitDecision,
    RequestFinished,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
    ResourceGauge,
    RouteDecision,
)
from servekit.metrics.hooks import EVENT_METHODS, Hook, HookSet
from servekit.metrics.logs import RequestLogHook, request_record
from servekit.metrics.otel import OtelHook
from servekit.metrics.prometheus import PrometheusHook
from servekit.metrics.stats import Histogram, StatsHook

__all__ = [
    "EVENT_METHODS",
    "KV_BLOCKS_IN_USE",
    "OPEN_STREAMS",
    "RATE_LIMIT_RESERVATIONS",
    "CacheStats",
    "EngineStep",
    "FirstToken",
    "Histogram",
    "Hook",
    "HookSet",
    "MetricsConfigError",
    "NewTokens",
    "OtelHook",
    "PrometheusHook",
    "RateLimitDecision",
    "RequestFinished",
    "RequestLogHook",
    "RequestPreempted",
    "RequestQueued",
    "RequestScheduled",
    "ResourceGauge",
    "RouteDecision",
    "StatsHook",
    "request_record",
]
