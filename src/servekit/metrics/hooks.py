"""The hook protocol every part reports through, and :class:`HookSet` to fan out to many hooks.

A hook subclasses :class:`Hook` and overrides only the methods it cares about. ``HookSet``
dispatches each event only to the hooks that override its method, so an event nobody listens to
costs one attribute check at the producer (``if hooks.wants.new_tokens: ...``).

Producers read ``hooks.wants.<event>`` and call ``hooks.on_<event>(...)`` each time rather than
caching the bound dispatcher: ``add``/``remove`` replace the dispatchers (``wants`` is updated
in place, so caching ``hooks.wants`` itself is fine).

A hook is a ``hook`` plugin (interface version 1, see :mod:`servekit.plugins`); exporters
(Prometheus, OpenTelemetry) are hooks too. Contract: a hook method is called on the producer's
thread, in the order the events happen for a request, and must return quickly and never block
(hand heavy work to a thread or a queue it owns); an exception it raises is caught, counted and
logged by :class:`HookSet`, never seen by serving. Events are plain frozen data: keep them, do
not mutate them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

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
    ResourceGauge,
    RouteDecision,
)

logger = logging.getLogger("servekit.metrics")

#: The event methods of :class:`Hook`, in a stable order (new events are appended).
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
    "on_resource_gauge",
)

_Listener = Callable[[Any], None]


class Hook:
    """Base class for hooks: every method is a no-op; override the ones you need."""

    #: the interface version this class implements (see :mod:`servekit.plugins`)
    api_version: ClassVar[int] = 1

    def on_request_queued(self, event: RequestQueued) -> None:
        """A request entered the waiting queue."""

    def on_request_scheduled(self, event: RequestScheduled) -> None:
        """A request was scheduled for the first time."""

    def on_request_preempted(self, event: RequestPreempted) -> None:
        """A running request was preempted."""

    def on_first_token(self, event: FirstToken) -> None:
        """A request produced its first token."""

    def on_new_tokens(self, event: NewTokens) -> None:
        """A request produced tokens in a step (after its first token)."""

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

    def on_resource_gauge(self, event: ResourceGauge) -> None:
        """The current amount of a held resource (KV blocks, reservations, open streams)."""


class _Wants:
    """Which events have at least one listener: ``wants.new_tokens`` and so on."""

    __slots__ = tuple(name[3:] for name in EVENT_METHODS)

    # Declared so type checkers see them; one per EVENT_METHODS entry (checked below).
    request_queued: bool
    request_scheduled: bool
    request_preempted: bool
    first_token: bool
    new_tokens: bool
    request_finished: bool
    engine_step: bool
    cache_stats: bool
    kv_event: bool
    rate_limit: bool
    route: bool
    resource_gauge: bool

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, False)

    def __repr__(self) -> str:
        on = [name for name in self.__slots__ if getattr(self, name)]
        return f"Wants({', '.join(on)})"


assert set(_Wants.__annotations__) == set(_Wants.__slots__), "declare every event on _Wants"


def _ignore(event: Any) -> None:
    return None


def listener(hook: Hook, name: str) -> _Listener | None:
    """``hook``'s handler for event method ``name``, or None when it does not override it.

    Works for subclasses overriding the method, for instance attributes, and for a nested
    :class:`HookSet` (which listens to exactly what its own hooks listen to).
    """
    method = getattr(hook, name)
    func = getattr(method, "__func__", method)
    if func is getattr(Hook, name) or func is _ignore:
        return None
    return method  # type: ignore[no-any-return]


class HookSet(Hook):
    """Dispatches events to many hooks; a raising hook is logged and the others still run.

    Each ``on_<event>`` is rebuilt on ``add``/``remove``: a no-op when nobody listens, a direct
    call inside ``try`` for one listener, a loop for several. A hook's first failure in a
    method is logged with its traceback, later ones at DEBUG; ``errors`` counts them all.
    A nested ``HookSet`` is read when it is added.
    """

    wants: _Wants

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._hooks: list[Hook] = []
        self.wants = _Wants()
        #: failures per ``"HookClass.on_event"``.
        self.errors: dict[str, int] = {}
        for hook in hooks:
            self._check(hook)
            self._hooks.append(hook)
        self._rebuild()

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The registered hooks, in dispatch order."""
        return tuple(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def add(self, hook: Hook) -> None:
        """Register ``hook``; it receives events from now on."""
        self._check(hook)
        self._hooks.append(hook)
        self._rebuild()

    def remove(self, hook: Hook) -> None:
        """Unregister ``hook`` (ValueError if it is not registered)."""
        self._hooks.remove(hook)
        self._rebuild()

    def _check(self, hook: Hook) -> None:
        if not isinstance(hook, Hook):
            raise TypeError(f"hook must be a servekit.metrics.Hook, got {type(hook).__name__}")
        if hook is self:
            raise ValueError("a HookSet cannot contain itself")

    def _rebuild(self) -> None:
        for name in EVENT_METHODS:
            bound = tuple(m for m in (listener(h, name) for h in self._hooks) if m is not None)
            setattr(self, name, self._dispatcher(name, bound))
            setattr(self.wants, name[3:], bool(bound))

    def _dispatcher(self, name: str, bound: tuple[_Listener, ...]) -> _Listener:
        if not bound:
            return _ignore
        failed = self._failed
        if len(bound) == 1:
            (method,) = bound

            def dispatch_one(event: Any) -> None:
                try:
                    method(event)
                except Exception:
                    failed(method, name)

            return dispatch_one

        def dispatch(event: Any) -> None:
            for method in bound:
                try:
                    method(event)
                except Exception:
                    failed(method, name)

        return dispatch

    def _failed(self, method: _Listener, name: str) -> None:
        owner = getattr(method, "__self__", method)
        key = f"{type(owner).__qualname__}.{name}"
        count = self.errors.get(key, 0) + 1
        self.errors[key] = count
        if count == 1:
            logger.exception("metrics hook %s raised; it is isolated and serving goes on", key)
        else:
            logger.debug("metrics hook %s raised again (%d times)", key, count, exc_info=True)
