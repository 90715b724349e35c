"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018).

A request goes to the first node on its key's walk whose in-flight load is under its capacity
``ceil(c * (total + 1) * share)``, where ``total`` is the in-flight work on the eligible nodes,
``+ 1`` counts the request being placed and ``share`` is the node's fraction of their weight
(``1 / n`` when all weights are equal). Since the capacities sum to at least
``c * (total + 1) > total`` for ``c >= 1``, some node is always under its capacity, and after
the placement no node holds more than ``ceil(c * average)``. The order of overflow is the walk
itself, so it is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from servekit._validators import number_in
from servekit.route.errors import (
    EmptyRingError,
    InvalidRouteParameterError,
    NoNodeAvailableError,
    UnknownNodeError,
)
from servekit.route.ring import HashRing

#: The default load factor ``c``.
DEFAULT_LOAD_FACTOR = 1.25

_LOAD_FACTOR = number_in(1, error=InvalidRouteParameterError)


def check_load_factor(c: float) -> float:
    """``c`` as a float; :class:`InvalidRouteParameterError` unless it is finite and >= 1."""
    return float(_LOAD_FACTOR.check("load_factor", c))


def capacity(total: int, share: float, c: float = DEFAULT_LOAD_FACTOR) -> int:
    """The in-flight work a node with ``share`` of the weight may reach when one more request
    is placed while ``total`` are in flight: ``ceil(c * (total + 1) * share)``."""
    return math.ceil(c * (total + 1) * share)


def first_under_capacity(
    walk: Iterable[str], loads: Mapping[str, int], capacities: Mapping[str, int]
) -> tuple[str, int] | None:
    """The first ``(node, index)`` of ``walk`` whose load is under its capacity, else None.

    Nodes missing from ``capacities`` are skipped (not eligible); missing loads count as 0.
    """
    for index, node in enumerate(walk):
        cap = capacities.get(node)
        if cap is not None and loads.get(node, 0) < cap:
            return node, index
    return None


def bounded_lookup(
    ring: HashRing, key: str | bytes, loads: Mapping[str, int], c: float = DEFAULT_LOAD_FACTOR
) -> str:
    """The node for ``key`` on ``ring`` under bounded loads, given every node's in-flight load.

    Loads of nodes not on the ring raise :class:`UnknownNodeError`.
    """
    c = check_load_factor(c)
    if not len(ring):
        raise EmptyRingError("the ring has no nodes")
    for node in loads:
        if node not in ring:
            raise UnknownNodeError(node)
    total = sum(loads.values())
    weight = sum(ring.weight(n) for n in ring)
    caps = {n: capacity(total, ring.weight(n) / weight, c) for n in ring}
    found = first_under_capacity(ring.walk(key), loads, caps)
    if found is None:  # unreachable: the capacities sum to more than the total load
        raise NoNodeAvailableError("no node is under its load capacity")
    return found[0]
