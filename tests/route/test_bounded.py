"""Bounded loads: the capacity bound, deterministic overflow, hot keys spread out."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.route import ConsistentHashPolicy, HashRing, Router
from servekit.route.bounded import bounded_lookup, capacity, first_under_capacity
from servekit.route.errors import InvalidRouteParameterError, UnknownNodeError

ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=120
)  # (place?, key id): few distinct keys make hot spots


@settings(max_examples=40)
@given(
    n=st.integers(1, 8),
    c=st.sampled_from([1.0, 1.1, 1.25, 2.0]),
    ops=ops,
    weighted=st.booleans(),
)
def test_in_flight_never_exceeds_ceil_c_times_average_plus_one(
    n: int, c: float, ops: list[tuple[bool, int]], weighted: bool
) -> None:
    weights = {f"r{i}": (1.0 + i % 3 if weighted else 1.0) for i in range(n)}
    router = Router(weights, policy=ConsistentHashPolicy(load_factor=c, vnodes=32))
    held: list[str] = []
    for place, key in ops:
        if place or not held:
            held.append(router.route(session_id=f"s{key}").node)
        else:
            router.release(held.pop(key % len(held)))
        total = len(held)
        weight = sum(weights.values())
        for node, load in router.loads.items():
            assert load <= math.ceil(c * total * weights[node] / weight) + 1
            if not weighted:
                assert load <= math.ceil(c * total / n) + 1


def test_a_hot_key_overflows_along_its_walk_deterministically() -> None:
    nodes = [f"r{i}" for i in range(4)]
    ring = HashRing(nodes, vnodes=64)
    walk = list(ring.walk("hot"))
    router = Router(nodes, policy=ConsistentHashPolicy(load_factor=1.0, vnodes=64))
    placed = [router.route(session_id="hot") for _ in range(8)]
    # c = 1: capacity ceil(total + 1) / 4, so the walk is filled in order, round after round
    assert [r.node for r in placed] == walk + walk
    assert [r.position for r in placed[:4]] == [0, 1, 2, 3]
    assert all(r.key == "session:hot" for r in placed)


def test_bounded_lookup_on_a_bare_ring() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=64)
    owner, second, third = ring.walk("k")
    assert bounded_lookup(ring, "k", {}) == owner
    # capacity = ceil(1.25 * 4 / 3) = 2: the owner at 2 is full, the next is not
    assert bounded_lookup(ring, "k", {owner: 2, second: 1}) == second
    # capacity = ceil(1.25 * 7 / 3) = 3: both are full
    assert bounded_lookup(ring, "k", {owner: 3, second: 3}) == third
    with pytest.raises(UnknownNodeError):
        bounded_lookup(ring, "k", {"zz": 1})
    with pytest.raises(InvalidRouteParameterError, match="load_factor"):
        bounded_lookup(ring, "k", {}, c=0.9)


def test_capacity_and_first_under_capacity() -> None:
    assert capacity(0, 1.0) == 2  # ceil(1.25)
    assert capacity(99, 0.01, 1.25) == 2  # ceil(1.25)
    assert capacity(399, 0.01, 1.25) == 5
    caps = {"a": 1, "b": 3}
    assert first_under_capacity(["x", "a", "b"], {"a": 1, "b": 2}, caps) == ("b", 2)
    assert first_under_capacity(["a", "b"], {"a": 1, "b": 3}, caps) is None


@pytest.mark.parametrize("c", [0.5, 0.999, float("nan"), float("inf"), True])
def test_bad_load_factor_is_rejected(c: float) -> None:
    with pytest.raises(InvalidRouteParameterError, match="load_factor"):
        ConsistentHashPolicy(load_factor=c)


def test_unbounded_policy_ignores_loads() -> None:
    router = Router(["a", "b", "c"], policy=ConsistentHashPolicy(load_factor=None, vnodes=16))
    nodes = {router.route(session_id="hot").node for _ in range(20)}
    assert len(nodes) == 1
