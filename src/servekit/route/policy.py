"""Routing policies: given a request's key and the eligible nodes, an ordered choice.

A policy implements :class:`RoutingPolicy`: membership callbacks (``add_node``,
``remove_node``, ``set_weight``) and ``choose``, which returns the chosen node first, then
distinct fallbacks. The router filters out unhealthy nodes before asking, so a policy sees only
eligible nodes. Built in: :class:`ConsistentHashPolicy` (bounded loads, the default),
:class:`LeastLoadedPolicy`, :class:`PowerOfTwoChoicesPolicy`, :class:`RoundRobinPolicy`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from attrs import frozen

from servekit.route.bounded import DEFAULT_LOAD_FACTOR, capacity, check_load_factor
from servekit.route.errors import MissingRouteKeyError
from servekit.route.hashing import HashFn, xxh3_64
from servekit.route.ring import DEFAULT_VNODES, HashRing


@frozen(slots=True)
class Candidates:
    """What a policy chooses from: eligible ``nodes`` (in membership order) and the in-flight
    ``loads`` and ``weights`` of every node."""

    nodes: tuple[str, ...]
    loads: Mapping[str, int]
    weights: Mapping[str, float]


@frozen(slots=True)
class Choice:
    """A policy's answer: ``nodes[0]`` is the choice, the rest are distinct fallbacks;
    ``position`` is where the choice sits in the policy's own order (0 = its first preference,
    e.g. the key's owner on the ring)."""

    nodes: tuple[str, ...]
    position: int = 0


@runtime_checkable
class RoutingPolicy(Protocol):
    """The protocol every routing policy implements (stateless ones ignore membership)."""

    def add_node(self, node: str, weight: float) -> None:
        """``node`` joined with ``weight``."""

    def remove_node(self, node: str) -> None:
        """``node`` left."""

    def set_weight(self, node: str, weight: float) -> None:
        """``node``'s weight changed."""

    def choose(self, key: str | bytes | None, candidates: Candidates, count: int) -> Choice:
        """Up to ``count`` distinct eligible nodes, best first (``candidates.nodes`` is never
        empty and ``count >= 1``)."""
        ...


class StatelessPolicy:
    """Base for policies that keep no per-node state: membership callbacks do nothing."""

    def add_node(self, node: str, weight: float) -> None:
        """Ignored."""

    def remove_node(self, node: str) -> None:
        """Ignored."""

    def set_weight(self, node: str, weight: float) -> None:
        """Ignored."""


def _by_load(nodes: Sequence[str], c: Candidates) -> list[str]:
    """``nodes`` sorted by load per unit of weight (ties keep their order)."""
    loads, weights = c.loads, c.weights
    return sorted(nodes, key=lambda n: loads.get(n, 0) / weights[n])


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

    def choose(self, key: str | bytes | None, candidates: Candidates, count: int) -> Choice:
        """The bounded-load walk of ``key`` over the eligible nodes."""
        if key is None:
            raise MissingRouteKeyError(
                "consistent hashing needs a routing key (session id, API key or prompt tokens)"
            )
        eligible = set(candidates.nodes)
        loads, weights, c = candidates.loads, candidates.weights, self.load_factor
        if c is not None:
            total = sum(loads.get(n, 0) for n in eligible)
            weight = sum(weights[n] for n in eligible)
        under: list[str] = []
        over: list[str] = []
        position = 0
        for index, node in enumerate(self.ring.walk(key)):
            if node not in eligible:
                continue
            if c is None or loads.get(node, 0) < capacity(total, weights[node] / weight, c):
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

    def choose(self, key: str | bytes | None, candidates: Candidates, count: int) -> Choice:
        """Eligible nodes by load, least loaded first."""
        return Choice(tuple(_by_load(candidates.nodes, candidates)[:count]))


class PowerOfTwoChoicesPolicy(StatelessPolicy):
    """The less loaded of two distinct nodes drawn at random from the injected ``rng``."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()

    def choose(self, key: str | bytes | None, candidates: Candidates, count: int) -> Choice:
        """The better of two random picks, then the other, then the rest by load."""
        nodes = candidates.nodes
        if len(nodes) == 1:
            return Choice(nodes)
        a, b = self.rng.sample(nodes, 2)
        first, second = _by_load((a, b), candidates)
        rest = _by_load([n for n in nodes if n != a and n != b], candidates)
        return Choice(tuple([first, second, *rest][:count]))


class RoundRobinPolicy(StatelessPolicy):
    """Each request to the next eligible node in turn; fallbacks are the ones after it."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, key: str | bytes | None, candidates: Candidates, count: int) -> Choice:
        """The next node in rotation, then its successors."""
        nodes = candidates.nodes
        start = self._next % len(nodes)
        self._next = start + 1
        order = nodes[start:] + nodes[:start]
        return Choice(order[:count])
