"""The hook protocol every part reports through, and :class:`HookSet` to fan out to many hooks.

A hook subclasses :class:`Hook` and overrides only the methods it cares about. ``HookSet``
dispatches each event only to the hooks that override its method, so an event nobody listens to
costs one attribute check at the producer (``if hooks.wants.new_tokens: ...``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

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

logger = logging.getLogger("servekit.metrics")

#: The event methods of :class:`Hook`, in a stable order.
EVENT_METHODS: tuple[str, ...] = (
    "on_request_queued",
    "on_request_scheduled",
    "on_request_preempted",
    "on_first_token",
    "on_new_tokens",
    "on_request_finished",
    "on_engine_step",
    "on_cache_stats",
    "on_kv_event",
    "on_rate_limit",
    "on_route",
)


class Hook:
    """Base class for hooks: every method is a no-op; override the ones you need."""

    def on_request_queued(self, event: RequestQueued) -> None:
        """A request entered the waiting queue."""

    def on_request_scheduled(self, event: RequestScheduled) -> None:
        """A request was scheduled for the first time."""

    def on_request_preempted(self, event: RequestPreempted) -> None:
        """A running request was preempted."""

    def on_first_token(self, event: FirstToken) -> None:
        """A request produced its first token."""

    def on_new_tokens(self, event: NewTokens) -> None:
        """A request produced tokens in a step."""

    def on_request_finished(self, event: RequestFinished) -> None:
        """A request ended."""

    def on_engine_step(self, event: EngineStep) -> None:
        """An engine step ran."""

    def on_cache_stats(self, event: CacheStats) -> None:
        """KV cache usage and prefix-cache counters after a step."""

    def on_kv_event(self, event: Any) -> None:
        """A KV block event (``servekit.kv.events``: stored, removed, all cleared)."""

    def on_rate_limit(self, event: RateLimitDecision) -> None:
        """A rate-limit decision."""

    def on_route(self, event: RouteDecision) -> None:
        """A routing decision."""


class _Wants:
    """Which events have at least one listener: ``wants.new_tokens`` and so on."""

    __slots__ = tuple(name[3:] for name in EVENT_METHODS)

    def __init__(self, listeners: dict[str, tuple[Callable[[Any], None], ...]]) -> None:
        for name in EVENT_METHODS:
            setattr(self, name[3:], bool(listeners[name]))


class HookSet(Hook):
    """Dispatches events to many hooks; a raising hook is logged and the others still run."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._hooks: list[Hook] = []
        self._rebuild()
        for hook in hooks:
            self.add(hook)

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The registered hooks, in dispatch order."""
        return tuple(self._hooks)

    def add(self, hook: Hook) -> None:
        """Register ``hook``; it receives events from now on."""
        if not isinstance(hook, Hook):
            raise TypeError(f"hook must be a servekit.metrics.Hook, got {type(hook).__name__}")
        self._hooks.append(hook)
        self._rebuild()

    def remove(self, hook: Hook) -> None:
        """Unregister ``hook`` (ValueError if it is not registered)."""
        self._hooks.remove(hook)
        self._rebuild()

    def _rebuild(self) -> None:
        listeners: dict[str, tuple[Callable[[Any], None], ...]] = {}
        for name in EVENT_METHODS:
            base = getattr(Hook, name)
            bound = tuple(
                getattr(h, name) for h in self._hooks if getattr(type(h), name) is not base
            )
            listeners[name] = bound
            setattr(self, name, self._make_dispatch(name, bound))
        self.wants = _Wants(listeners)

    @staticmethod
    def _make_dispatch(
        name: str, bound: tuple[Callable[[Any], None], ...]
    ) -> Callable[[Any], None]:
        if not bound:
            return _ignore

        def dispatch(event: Any) -> None:
            for method in bound:
                try:
                    method(event)
                except Exception:
                    logger.exception("metrics hook %r raised in %s", method, name)

        return dispatch


def _ignore(event: Any) -> None:
    return None
