"""The replica router: routing key, health filter, policy choice, in-flight loads, events.

One call to :meth:`Router.route` derives the request's routing key (session id, prompt prefix
or API key, in ``key_order``), keeps the routable replicas, asks the policy for a choice and
fallbacks, counts the request in flight on the chosen replica and reports a
:class:`~servekit.metrics.RouteDecision` to the hooks. The caller reports the outcome with
:meth:`Router.release`, which feeds the health tracker; to retry, it releases the failed
replica and routes again with ``exclude`` (or acquires a fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import xxhash
from attrs import frozen

from servekit._validators import int_at_least
from servekit.metrics.events import RouteDecision
from servekit.metrics.hooks import HookSet
from servekit.route.errors import (
    DuplicateNodeError,
    InvalidRouteParameterError,
    NoNodeAvailableError,
    UnknownNodeError,
)
from servekit.route.health import HealthTracker
from servekit.route.keys import PrefixKey
from servekit.route.policy import (
    Candidate,
    ReplicaLoad,
    RouteRequest,
    RoutingPolicy,
    make_routing_policy,
)
from servekit.route.ring import check_weight

#: Key sources, in the default order of preference.
KEY_SOURCES = ("session", "prefix", "api_key")
#: The smallest fraction of its weight a replica gets at the start of its slow start.
SLOW_START_FLOOR = 0.1

_NON_NEGATIVE = int_at_least(0, error=InvalidRouteParameterError)


@runtime_checkable
class CacheIndex(Protocol):
    """Which replicas hold which KV blocks (e.g. an index fed by the replicas' KV events)."""

    def cached_blocks(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """For each replica known to hold the first block, how many of the leading
        ``block_hashes`` it holds (replicas it omits hold none)."""
        ...


@frozen(slots=True)
class Route:
    """Where a request goes: ``node``, then ``fallbacks`` for retries (distinct, routable).

    ``key`` names the routing key (``"session:<id>"``, ``"prefix:<hash>"``,
    ``"api_key:<hash>"``; API keys are never exposed) or is None; ``position`` is the choice's
    index in the policy's order (on the ring: how far the walk went past the key's owner).
    """

    node: str
    fallbacks: tuple[str, ...]
    key: str | None
    position: int


class Router:
    """Routes requests over replicas with health, bounded loads and prefix affinity.

    ``replicas`` is an iterable of names or a mapping ``name -> weight``. ``policy`` is a
    :class:`RoutingPolicy` or its spec (default ``"consistent_hash"``, c = 1.25); ``health``
    defaults to a :class:`HealthTracker` on ``clock``; ``prefix`` says how prompts are hashed
    (it must match the replicas' KV cache). ``index`` tells how many of a request's blocks each
    replica holds; replicas report their own load with :meth:`report_load`.

    ``slow_start`` (seconds, 0: off) ramps a replica that comes back ``UP`` (its breaker
    closed, or it was marked up again): for that long after its return, policies see its
    weight scaled by the fraction of the window elapsed (at least :data:`SLOW_START_FLOOR`),
    so load-aware policies and the bounded-load cap send it a growing share instead of a
    burst on a cold cache. Policies that ignore weights (round-robin) are not slowed.
    """

    def __init__(
        self,
        replicas: Iterable[str] | Mapping[str, float] = (),
        *,
        policy: str | RoutingPolicy | None = None,
        health: HealthTracker | None = None,
        prefix: PrefixKey | None = None,
        key_order: Sequence[str] = KEY_SOURCES,
        num_fallbacks: int = 2,
        hooks: HookSet | None = None,
        clock: Callable[[], float] = time.monotonic,
        index: CacheIndex | None = None,
        slow_start: float = 0.0,
    ) -> None:
        bad = [s for s in key_order if s not in KEY_SOURCES]
        if (isinstance(slow_start, bool) or not isinstance(slow_start, (int, float))
                or not 0 <= slow_start < float("inf")):
            raise InvalidRouteParameterError(
                "slow_start", f"must be a finite number of seconds >= 0, got {slow_start!r}")
        if bad or len(set(key_order)) != len(key_order):
            raise InvalidRouteParameterError(
                "key_order", f"must be distinct names from {KEY_SOURCES}, got {tuple(key_order)}"
            )
        _NON_NEGATIVE.check("num_fallbacks", num_fallbacks)
        self.policy: RoutingPolicy = make_routing_policy(policy)
        self.health = health if health is not None else HealthTracker(clock=clock)
        self.prefix = prefix if prefix is not None else PrefixKey()
        self.key_order = tuple(key_order)
        self.num_fallbacks = num_fallbacks
        self.hooks = hooks
        self.clock = clock
        self.index = index
        self.slow_start = float(slow_start)
        self._weights: dict[str, float] = {}
        self._loads: dict[str, int] = {}
        self._reported: dict[str, ReplicaLoad] = {}
        items = replicas.items() if isinstance(replicas, Mapping) else ((r, 1.0) for r in replicas)
        for name, weight in items:
            self.add_replica(name, weight)

    # ---- membership -------------------------------------------------------------------------

    @property
    def replicas(self) -> tuple[str, ...]:
        """The replicas, in the order they were added."""
        return tuple(self._weights)

    def add_replica(self, name: str, weight: float = 1.0) -> None:
        """Add a replica (``UP``, no load)."""
        if name in self._weights:
            raise DuplicateNodeError(name)
        weight = check_weight(weight)
        self.policy.add_node(name, weight)
        if name not in self.health:
            self.health.add(name)
        self._weights[name] = weight
        self._loads[name] = 0

    def remove_replica(self, name: str) -> None:
        """Remove a replica; its in-flight count is forgotten."""
        self._check(name)
        self.policy.remove_node(name)
        self.health.remove(name)
        del self._weights[name], self._loads[name]
        self._reported.pop(name, None)

    def set_weight(self, name: str, weight: float) -> None:
        """Change a replica's weight."""
        self._check(name)
        weight = check_weight(weight)
        self.policy.set_weight(name, weight)
        self._weights[name] = weight

    def load(self, name: str) -> int:
        """The replica's in-flight requests."""
        self._check(name)
        return self._loads[name]

    @property
    def loads(self) -> Mapping[str, int]:
        """In-flight requests per replica (a copy)."""
        return dict(self._loads)

    def report_load(self, name: str, load: ReplicaLoad) -> None:
        """Record the load replica ``name`` reports about itself (policies see the latest)."""
        self._check(name)
        if not isinstance(load, ReplicaLoad):
            raise InvalidRouteParameterError("load", f"must be a ReplicaLoad, got {load!r}")
        self._reported[name] = load

    def reported_load(self, name: str) -> ReplicaLoad | None:
        """The load ``name`` last reported, or None."""
        self._check(name)
        return self._reported.get(name)

    # ---- routing ----------------------------------------------------------------------------

    def routing_key(
        self,
        *,
        session_id: str | None = None,
        api_key: str | None = None,
        token_ids: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> tuple[str | bytes, str] | None:
        """``(key, label)`` from the first available source of ``key_order``, or None."""
        for source in self.key_order:
            if source == "session" and session_id is not None:
                return session_id, f"session:{session_id}"
            if source == "api_key" and api_key is not None:
                return api_key, f"api_key:{xxhash.xxh3_64_intdigest(api_key.encode()):016x}"
            if source == "prefix" and token_ids is not None:
                h = self.prefix.block_hash(token_ids, cache_salt)
                if h is not None:
                    return h.to_bytes(8, "little"), f"prefix:{h:015x}"
        return None

    def route(
        self,
        *,
        session_id: str | None = None,
        api_key: str | None = None,
        token_ids: Sequence[int] | None = None,
        cache_salt: str | None = None,
        tenant: str | None = None,
        block_hashes: Sequence[int] | None = None,
        exclude: Collection[str] = (),
    ) -> Route:
        """Choose a replica for a request and count it in flight there (see :meth:`release`).

        ``block_hashes`` are the prompt's chained KV block hashes; with an ``index`` and
        ``token_ids`` but no hashes, the router computes them with its ``prefix`` settings.

        Raises :class:`NoNodeAvailableError` when no replica is routable, and
        :class:`~servekit.route.MissingRouteKeyError` when the policy needs a key and the
        request has none.
        """
        found = self.routing_key(
            session_id=session_id, api_key=api_key, token_ids=token_ids, cache_salt=cache_salt
        )
        key, label = found if found is not None else (None, None)
        now = self.clock()
        routable = self.health.routable
        nodes = [n for n in self._weights if n not in exclude and routable(n, now)]
        if not nodes:
            raise NoNodeAvailableError(
                f"no routable replica among {len(self._weights)} (others ejected, down or excluded)"
            )
        if block_hashes is None and self.index is not None and token_ids is not None:
            block_hashes = self.prefix.block_hashes(token_ids, cache_salt)
        hashes = tuple(block_hashes) if block_hashes is not None else ()
        held = self.index.cached_blocks(hashes) if self.index is not None and hashes else {}
        state, weights, loads, reported = (
            self.health.state, self._weights, self._loads, self._reported)
        if self.slow_start:
            weights = {n: self._ramped(n, w, now) for n, w in weights.items()}
        candidates = [
            Candidate(n, weights[n], state(n), loads[n], reported.get(n), held.get(n, 0))
            for n in nodes
        ]
        choice = self.policy.choose(
            RouteRequest(key, tenant, hashes), candidates, 1 + self.num_fallbacks
        )
        node = choice.nodes[0]
        self._acquire(node, now)
        hooks = self.hooks
        if hooks is not None and hooks.wants.route:
            hooks.on_route(RouteDecision(label or "", node, choice.position, now))
        return Route(node, choice.nodes[1:], label, choice.position)

    def acquire(self, name: str) -> None:
        """Count one more request in flight on ``name`` (e.g. a retry sent to a fallback)."""
        self._check(name)
        self._acquire(name, self.clock())

    def release(self, name: str, success: bool | None = True) -> None:
        """A request on ``name`` ended: ``success`` True/False feeds health, None (e.g. the
        client went away) does not."""
        self._check(name)
        if self._loads[name] <= 0:
            raise InvalidRouteParameterError("name", f"replica {name!r} has no request in flight")
        self._loads[name] -= 1
        if success is True:
            self.health.record_success(name)
        elif success is False:
            self.health.record_failure(name)

    def _ramped(self, name: str, weight: float, now: float) -> float:
        """``weight`` scaled down while ``name`` is in its slow-start window."""
        up_for = self.health.up_for(name, now)
        if up_for is None or up_for >= self.slow_start:
            return weight
        return weight * max(SLOW_START_FLOOR, up_for / self.slow_start)

    def _acquire(self, name: str, now: float) -> None:
        self._loads[name] += 1
        self.health.dispatched(name, now)

    def _check(self, name: str) -> None:
        if name not in self._weights:
            raise UnknownNodeError(name)
