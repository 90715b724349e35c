"""Observability: events, hooks, in-process stats and exporters.

``PrometheusHook`` and ``OtelHook`` import their libraries only when built, so this package
imports without the ``prometheus`` and ``otel`` extras. Every event type (and the gauge names)
is in :mod:`servekit.metrics.events`, the hook protocol in :mod:`servekit.metrics.hooks`: the
bottom layer, which every other part imports.
"""

from servekit.metrics.errors import MetricsConfigError
from servekit.metrics.events import EngineStep, RequestFinished
from servekit.metrics.hooks import Hook, HookSet
from servekit.metrics.logs import RequestLogHook
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
]
