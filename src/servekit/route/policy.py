"""Routing policies: given a request and the eligible replicas, an ordered choice.

A policy implements :class:`RoutingPolicy` (interface version 1, see :mod:`servekit.plugins`):
membership callbacks (``add_node``, ``remove_node``, ``set_weight``) and ``choose``, which
returns the chosen replica first, then distinct fallbacks. What a policy sees is fleet-ready:
the request (:class:`RouteRequest`: routing key, tenant, the prompt's block hashes) and each
eligible replica (:class:`Candidate`: weight, health, this router's in-flight count, the load
the replica itself reports, how many of the request's blocks it is known to hold). The router
filters out unroutable replicas before asking. Built in: :class:`ConsistentHashPolicy`
(bounded loads, the default), :class:`LeastLoadedPolicy`, :class:`PowerOfTwoChoicesPolicy`,
:class:`RoundRobinPolicy`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from attrs import field, frozen

from servekit import plugins
from servekit._validators import int_at_least, number_in
from servekit.route.bounded import DEFAULT_LOAD_FACTOR, capacity, check_load_factor
from servekit.route.errors import InvalidRouteParameterError, MissingRouteKeyError
from servekit.route.hashing import HashFn, xxh3_64
from servekit.route.health import NodeHealth
from servekit.route.ring import DEFAULT_VNODES, HashRing

_count = int_at_least(0, error=InvalidRouteParameterError)
_fraction = number_in(0, 1, error=InvalidRouteParameterError)


@frozen(slots=True)
class ReplicaLoad:
    """The load a replica reports about itself (shared by every router that reads it):
    requests ``running`` and ``waiting`` in its scheduler, and the fraction of its KV cache in
    use (``kv_usage``, 0 to 1)."""

    running: int = field(validator=_count)
    waiting: int = field(validator=_count)
    kv_usage: float = field(validator=_fraction)


@frozen(slots=True)
class RouteRequest:
    """What a policy knows of the request: its routing ``key`` (session id, API key or prompt
    prefix, as the router derived it; None when it has none), its ``tenant``, and the prompt's
    chained KV ``block_hashes`` (:mod:`servekit.kv.hashing`; empty when not computed)."""

    key: str | bytes | None
    tenant: str | None = None
    block_hashes: tuple[int, ...] = ()


@frozen(slots=True)
class Candidate:
    """One eligible replica as a policy sees it.

    ``in_flight`` counts this router's requests on it; ``load`` is what the replica last
    reported (None before its first report); ``cached_blocks`` is how many of the request's
    leading blocks it is known to hold (from a KV-event index; 0 without one).
    """

    name: str
    weight: float
    health: NodeHealth = NodeHealth.UP
    in_flight: int = 0
    load: ReplicaLoad | None = None
    cached_blocks: int = 0

    @property
    def load_estimate(self) -> int:
        """Requests on the replica: its reported running + waiting, or this router's
        in-flight count when that is higher (a report lags) or there is no report."""
        load = self.load
        if load is None:
            return self.in_flight
        return max(self.in_flight, load.running + load.waiting)


@frozen(slots=True)
class Choice:
    """A policy's answer: ``nodes[0]`` is the choice, the rest are distinct fallbacks;
    ``position`` is where the choice sits in the policy's own order (0 = its first preference,
    e.g. the key's owner on the ring)."""

    nodes: tuple[str, ...]
    position: int = 0


@runtime_checkable
class RoutingPolicy(Protocol):
    """The protocol every routing policy implements (stateless ones ignore membership).

    Contract: ``choose`` returns 1 to ``count`` distinct names, all from ``candidates`` (never
    an ejected, down or excluded replica: the router passes only routable ones); it is called
    with at least one candidate and ``count >= 1``; it must be fast (it runs per request) and
    must not keep ``candidates`` (they are rebuilt per call). The membership callbacks are
    called for every replica added, removed or reweighted, before any ``choose`` sees it.
    """

    def add_node(self, node: str, weight: float) -> None:
        """``node`` joined with ``weight``."""

    def remove_node(self, node: str) -> None:
        """``node`` left."""

    def set_weight(self, node: str, weight: float) -> None:
        """``node``'s weight changed."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """Up to ``count`` distinct eligible replicas, best first."""
        ...


def make_routing_policy(policy: str | RoutingPolicy | None) -> RoutingPolicy:
    """A routing policy from a spec (``"consistent_hash"``, ``"least_loaded"``,
    ``"power_of_two"``, ``"round_robin"``, a plugin's name, or ``'NAME:{...}'``) or an
    instance; None is ``"consistent_hash"``."""
    made = plugins.resolve("routing_policy", "consistent_hash" if policy is None else policy,
                           what="routing_policy")
    if not isinstance(made, RoutingPolicy):
        raise plugins.PluginTypeError(
            f"routing_policy must implement servekit.route.RoutingPolicy, got {type(made).__name__}"
        )
    return made


class StatelessPolicy:
    """Base for policies that keep no per-node state: membership callbacks do nothing."""

    def add_node(self, node: str, weight: float) -> None:
        """Ignored."""

    def remove_node(self, node: str) -> None:
        """Ignored."""

    def set_weight(self, node: str, weight: float) -> None:
        """Ignored."""


def _by_load(candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` sorted by load per unit of weight (ties keep their order)."""
    return sorted(candidates, key=lambda c: c.load_estimate / c.weight)


def _names(candidates: Sequence[Candidate]) -> tuple[str, ...]:
    return tuple(c.name for c in candidates)


class ConsistentHashPolicy:
    """Consistent hashing on the request's key with bounded loads.

    The choice is the first eligible node on the key's ring walk whose load is under
    ``ceil(load_factor * (total + 1) * share)`` (``load_factor=None`` disables the bound);
    fallbacks are the next eligible nodes under their capacity, then the overloaded ones, each
    in walk order.
    """

    def __init__(
        self,
        *,
        load_factor: float | None = DEFAULT_LOAD_FACTOR,
        vnodes: int = DEFAULT_VNODES,
        hash_fn: HashFn = xxh3_64,
    ) -> None:
        self.load_factor = None if load_factor is None else check_load_factor(load_factor)
        self.ring = HashRing(vnodes=vnodes, hash_fn=hash_fn)

    def add_node(self, node: str, weight: float) -> None:
        """Add ``node`` to the ring."""
        self.ring.add(node, weight)

    def remove_node(self, node: str) -> None:
        """Remove ``node`` from the ring."""
        self.ring.remove(node)

    def set_weight(self, node: str, weight: float) -> None:
        """Reweight ``node`` on the ring."""
        self.ring.set_weight(node, weight)

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """The bounded-load walk of the request's key over the eligible nodes."""
        key = request.key
        if key is None:
            raise MissingRouteKeyError(
                "consistent hashing needs a routing key (session id, API key or prompt tokens)"
            )
        eligible = {cand.name: cand for cand in candidates}
        c = self.load_factor
        if c is not None:
            total = sum(cand.load_estimate for cand in candidates)
            weight = sum(cand.weight for cand in candidates)
        under: list[str] = []
        over: list[str] = []
        position = 0
        for index, node in enumerate(self.ring.walk(key)):
            cand = eligible.get(node)
            if cand is None:
                continue
            if c is None or cand.load_estimate < capacity(total, cand.weight / weight, c):
                if not under:
                    position = index
                under.append(node)
                if len(under) == count:
                    break
            else:
                over.append(node)
        return Choice(tuple((under + over)[:count]), position)


class LeastLoadedPolicy(StatelessPolicy):
    """The node with the least in-flight work per unit of weight (ties: membership order)."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """Eligible nodes by load, least loaded first."""
        return Choice(_names(_by_load(candidates)[:count]))


class PowerOfTwoChoicesPolicy(StatelessPolicy):
    """The less loaded of two distinct nodes drawn at random from the injected ``rng``."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """The better of two random picks, then the other, then the rest by load."""
        if len(candidates) == 1:
            return Choice(_names(candidates))
        a, b = self.rng.sample(list(candidates), 2)
        first, second = _by_load((a, b))
        rest = _by_load([c for c in candidates if c is not a and c is not b])
        return Choice(_names([first, second, *rest][:count]))


class RoundRobinPolicy(StatelessPolicy):
    """Each request to the next eligible node in turn; fallbacks are the ones after it."""

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """The next node in rotation, then its successors."""
        nodes = _names(candidates)
        start = self._next % len(nodes)
        self._next = start + 1
        order = nodes[start:] + nodes[:start]
        return Choice(order[:count])
