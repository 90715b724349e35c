"""The cache-aware policy: the routing-policy contract, its score, bounded loads, agreement."""

from __future__ import annotations

import pytest

from servekit.route import (
    CacheAwarePolicy,
    Candidate,
    ReplicaLoad,
    Router,
    RouteRequest,
)
from servekit.route.errors import InvalidRouteParameterError
from servekit.route.kv_index import KVEventIndex
from servekit.testing import RoutingPolicyContract


class TestCacheAwareContract(RoutingPolicyContract):
    policy_factory = CacheAwarePolicy
    load_factor = 1.25


def _req(n: int = 4, key: str = "k") -> RouteRequest:
    return RouteRequest(key, None, tuple(range(1, n + 1)))


def test_prefers_the_replica_holding_the_prefix() -> None:
    policy = CacheAwarePolicy()
    cands = [Candidate("a", 1.0, cached_blocks=0), Candidate("b", 1.0, cached_blocks=4),
             Candidate("c", 1.0, cached_blocks=2)]
    assert policy.choose(_req(), cands, 3).nodes == ("b", "c", "a")


def test_load_outweighs_a_small_hit() -> None:
    """One cached block of 4 (0.25) does not beat being two mean loads busier."""
    policy = CacheAwarePolicy(load_factor=None)
    cands = [Candidate("a", 1.0, load=ReplicaLoad(6, 0, 0.5), cached_blocks=1),
             Candidate("b", 1.0, load=ReplicaLoad(0, 0, 0.0))]
    assert policy.choose(_req(), cands, 1).nodes == ("b",)


def test_bounded_load_caps_the_hot_replica() -> None:
    """The replica holding everything is skipped once it is at c x mean."""
    policy = CacheAwarePolicy(load_factor=1.25, load_weight=0.0)
    cands = [Candidate("a", 1.0, load=ReplicaLoad(5, 0, 0.0), cached_blocks=4),
             Candidate("b", 1.0, load=ReplicaLoad(1, 0, 0.0)),
             Candidate("c", 1.0, load=ReplicaLoad(1, 0, 0.0))]
    choice = policy.choose(_req(), cands, 3)
    assert choice.nodes[0] != "a" and choice.nodes[-1] == "a"
    assert choice.position > 0


def test_new_prefixes_spread_but_agree_across_policies() -> None:
    """With nothing cached and equal loads, the key decides (rendezvous), identically for
    two independent policy instances (two gateways), and different keys spread."""
    cands = [Candidate(n, 1.0) for n in "abcd"]
    one, two = CacheAwarePolicy(), CacheAwarePolicy()
    picks = [one.choose(_req(key=f"s{i}"), cands, 1).nodes[0] for i in range(200)]
    assert picks == [two.choose(_req(key=f"s{i}"), cands, 1).nodes[0] for i in range(200)]
    assert {picks.count(n) for n in "abcd"} and min(picks.count(n) for n in "abcd") > 20


def test_reported_load_makes_two_routers_agree() -> None:
    """Two routers (gateways) with the same replica reports and KV events choose alike, even
    though their own in-flight counts differ."""
    index = KVEventIndex()
    index.stored("b", 0, [11, 12])
    routers = [Router(["a", "b", "c"], policy="cache_aware", index=index) for _ in range(2)]
    for r in routers:
        for name, running in (("a", 3), ("b", 3), ("c", 3)):
            r.report_load(name, ReplicaLoad(running, 0, 0.1))
    routers[0].acquire("a")  # gateway 0 has one request of its own in flight
    got = [r.route(session_id="x", block_hashes=[11, 12, 13]).node for r in routers]
    assert got == ["b", "b"]


@pytest.mark.parametrize("kwargs", [{"load_factor": 0.5}, {"load_weight": -1.0},
                                    {"load_weight": float("nan")}])
def test_bad_parameters_name_the_field(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRouteParameterError, match=next(iter(kwargs))):
        CacheAwarePolicy(**kwargs)
