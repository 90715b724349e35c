"""Observability: events, hooks, in-process stats and exporters."""

from servekit.metrics.events import (
    CacheStats,
    EngineStep,
    FirstToken,
    NewTokens,
    RateLimitDecision,
    RequestFinished,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
    RouteDecision,
)
from servekit.metrics.hooks import EVENT_METHODS, Hook, HookSet

__all__ = [
    "EVENT_METHODS",
    "CacheStats",
    "EngineStep",
    "FirstToken",
    "Hook",
    "HookSet",
    "NewTokens",
    "RateLimitDecision",
    "RequestFinished",
    "RequestPreempted",
    "RequestQueued",
    "RequestScheduled",
    "RouteDecision",
]
