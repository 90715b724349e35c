"""HashRing: placement, movement on change, weights, determinism, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servekit.route import HashRing
from servekit.route.errors import (
    DuplicateNodeError,
    EmptyRingError,
    InvalidRouteParameterError,
    UnknownNodeError,
)
from servekit.route.hashing import hash_keys, xxh64

KEYS = [f"key-{i}" for i in range(4000)]
names = st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=12, unique=True)


def owners(ring: HashRing, keys: list[str] = KEYS) -> list[str]:
    return ring.lookup_many(keys)


@settings(max_examples=25)
@given(nodes=names, new=st.text("xyz", min_size=1, max_size=3))
def test_adding_a_node_moves_keys_only_to_it_about_its_share(nodes: list[str], new: str) -> None:
    ring = HashRing(nodes, vnodes=128)
    before = owners(ring)
    ring.add(new)
    after = owners(ring)
    moved = [a for b, a in zip(before, after, strict=True) if a != b]
    assert all(a == new for a in moved)
    share = ring.shares()[new]
    # key sampling noise on 4000 keys: 6 sigma
    assert abs(len(moved) / len(KEYS) - share) <= 6 * math.sqrt(share / len(KEYS)) + 1e-9


@settings(max_examples=25)
@given(nodes=names.filter(lambda n: len(n) >= 2), data=st.data())
def test_removing_a_node_moves_only_its_keys(nodes: list[str], data: st.DataObject) -> None:
    ring = HashRing(nodes, vnodes=128)
    gone = data.draw(st.sampled_from(nodes))
    before = owners(ring)
    walks = {k: ring.fallbacks(k, 2) for k, o in zip(KEYS, before, strict=True) if o == gone}
    ring.remove(gone)
    after = owners(ring)
    for key, b, a in zip(KEYS, before, after, strict=True):
        if b == gone:
            assert a == walks[key][1]  # the next node on its walk
        else:
            assert a == b


@settings(max_examples=25)
@given(
    weights=st.lists(st.floats(0.25, 4.0), min_size=2, max_size=8),
    vnodes=st.sampled_from([256, 1024]),
)
def test_weights_are_honoured_within_tolerance(weights: list[float], vnodes: int) -> None:
    ring = HashRing({f"n{i}": w for i, w in enumerate(weights)}, vnodes=vnodes)
    shares = ring.shares()
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    total = sum(ring.num_points(n) for n in ring)
    for node in ring:
        points = ring.num_points(node)
        expected = points / total
        # a node's share has a relative spread of about 1/sqrt(points): allow 5 spreads
        assert abs(shares[node] / expected - 1) <= 5 / math.sqrt(points)
        assert abs(points - ring.weight(node) * vnodes) <= 0.5


def test_default_ring_is_balanced_at_100_nodes() -> None:
    ring = HashRing([f"node-{i}" for i in range(100)])
    shares = np.array(list(ring.shares().values())) * 100
    assert shares.max() <= 1.05
    assert shares.min() >= 0.95


@settings(max_examples=20)
@given(nodes=names, weight=st.floats(0.1, 5.0), data=st.data())
def test_reweighting_moves_keys_only_to_or_from_that_node(
    nodes: list[str], weight: float, data: st.DataObject
) -> None:
    ring = HashRing(nodes, vnodes=64)
    node = data.draw(st.sampled_from(nodes))
    before = owners(ring)
    ring.set_weight(node, weight)
    after = owners(ring)
    for b, a in zip(before, after, strict=True):
        assert a == b or node in (a, b)
    assert ring.weight(node) == weight


@settings(max_examples=25)
@given(nodes=names, n=st.integers(0, 15))
def test_fallbacks_are_distinct_and_start_with_the_owner(nodes: list[str], n: int) -> None:
    ring = HashRing(nodes, vnodes=16)
    for key in KEYS[:50]:
        fb = ring.fallbacks(key, n)
        assert len(fb) == min(n, len(nodes))
        assert len(set(fb)) == len(fb)
        if fb:
            assert fb[0] == ring.lookup(key)
        assert sorted(ring.walk(key)) == sorted(nodes)


def test_scalar_and_vectorized_lookups_agree_on_both_table_widths() -> None:
    for count, vnodes in ((7, 300), (300, 4)):  # 8-bit and 16-bit bucket tables
        ring = HashRing([f"n{i}" for i in range(count)], vnodes=vnodes)
        scalar = [ring.lookup(k) for k in KEYS]
        assert ring.lookup_many(KEYS) == scalar
        assert [ring.lookup(k.encode()) for k in KEYS[:100]] == scalar[:100]
        assert [ring.lookup_hash(h) for h in hash_keys(KEYS).tolist()] == scalar
        # the bucket table's direct path and the bisect path both ran
        assert ring.locate_hashes(hash_keys(KEYS)).tolist() == [ring.nodes.index(o) for o in scalar]


class RingMachine(RuleBasedStateMachine):
    """Any history of changes gives the same ring as building the final membership at once."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = HashRing(vnodes=32)
        self.model: dict[str, float] = {}

    @rule(name=st.text("abcdef", min_size=1, max_size=3), weight=st.floats(0.1, 3.0))
    def add(self, name: str, weight: float) -> None:
        if name in self.model:
            with pytest.raises(DuplicateNodeError):
                self.ring.add(name, weight)
        else:
            self.ring.add(name, weight)
            self.model[name] = weight

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.ring.remove(name)
        del self.model[name]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), weight=st.floats(0.1, 3.0))
    def reweight(self, data: st.DataObject, weight: float) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.ring.set_weight(name, weight)
        self.model[name] = weight

    @invariant()
    def same_as_fresh_ring(self) -> None:
        assert set(self.ring.nodes) == set(self.model)
        if not self.model:
            with pytest.raises(EmptyRingError):
                self.ring.lookup("k")
            return
        fresh = HashRing(self.model, vnodes=32)
        keys = KEYS[:300]
        assert self.ring.lookup_many(keys) == fresh.lookup_many(keys)
        assert [self.ring.lookup(k) for k in keys] == fresh.lookup_many(keys)


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=15, stateful_step_count=12)


_CHILD = """
from servekit.route import HashRing
ring = HashRing([f"node-{i}" for i in range(20)], vnodes=64)
print(",".join(ring.lookup(f"session-{i}") for i in range(300)))
"""


@pytest.mark.slow
def test_lookups_agree_across_processes_with_different_hash_seeds() -> None:
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        )
        results.append(out.stdout.strip())
    here = HashRing([f"node-{i}" for i in range(20)], vnodes=64)
    assert results[0] == results[1] == ",".join(here.lookup(f"session-{i}") for i in range(300))


def test_hash_function_is_pluggable() -> None:
    def md5(data: bytes) -> int:  # 128 bits: the ring masks it to 64
        return int.from_bytes(hashlib.md5(data).digest(), "big")

    nodes = [f"n{i}" for i in range(10)]
    a, b, c = (
        HashRing(nodes, vnodes=64),
        HashRing(nodes, hash_fn=md5, vnodes=64),
        HashRing(nodes, hash_fn=xxh64, vnodes=64),
    )
    assert b.hash("k") == md5(b"k") & (2**64 - 1)
    assert a.lookup_many(KEYS) != b.lookup_many(KEYS) != c.lookup_many(KEYS)
    assert b.lookup_many(KEYS) == [b.lookup(k) for k in KEYS]


def test_single_node_owns_everything() -> None:
    ring = HashRing(["only"], vnodes=1)
    assert ring.shares() == {"only": 1.0}
    assert set(ring.lookup_many(KEYS)) == {"only"}
    assert ring.fallbacks("k", 3) == ["only"]


def test_bad_input_gets_clear_errors() -> None:
    ring = HashRing(["a", "b"])
    with pytest.raises(DuplicateNodeError, match="'a'"):
        ring.add("a")
    with pytest.raises(DuplicateNodeError):
        HashRing(["a", "a"])
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(InvalidRouteParameterError, match="weight"):
            ring.add("c", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRouteParameterError, match="weight"):
            ring.set_weight("a", bad)  # type: ignore[arg-type]
    assert "c" not in ring and len(ring) == 2
    with pytest.raises(UnknownNodeError, match="'zz'"):
        ring.remove("zz")
    with pytest.raises(UnknownNodeError):
        ring.weight("zz")
    with pytest.raises(KeyError):  # also a KeyError
        ring.set_weight("zz", 1.0)
    with pytest.raises(InvalidRouteParameterError, match="vnodes"):
        HashRing(vnodes=0)
    with pytest.raises(InvalidRouteParameterError, match="node"):
        ring.add(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRouteParameterError, match="n"):
        ring.fallbacks("k", -1)
    empty = HashRing()
    for call in (
        lambda: empty.lookup("k"),
        lambda: empty.lookup_hash(5),
        lambda: empty.walk("k"),
        lambda: empty.lookup_many(["k"]),
    ):
        with pytest.raises(EmptyRingError):
            call()
    ring.remove("a")
    ring.remove("b")
    with pytest.raises(EmptyRingError):
        ring.lookup("k")
