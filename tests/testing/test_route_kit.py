"""The routing-policy kit: built-in policies pass with their promises; planted bugs fail."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import xxhash

from servekit.route.policy import (
    Candidate,
    Choice,
    ConsistentHashPolicy,
    LeastLoadedPolicy,
    PowerOfTwoChoicesPolicy,
    RoundRobinPolicy,
    RouteRequest,
    StatelessPolicy,
)
from servekit.testing import InvariantViolationError
from servekit.testing.route import RoutingPolicyContract, routing_policy_contract


class TestConsistentHash(RoutingPolicyContract):
    policy_factory = ConsistentHashPolicy
    load_factor = 1.25
    stable = True


TestConsistentHashUnbounded = pytest.mark.slow(routing_policy_contract(
    lambda: ConsistentHashPolicy(load_factor=None), stable=True))


class TestLeastLoaded(RoutingPolicyContract):
    policy_factory = LeastLoadedPolicy
    load_factor = 1.0


class TestPowerOfTwo(RoutingPolicyContract):
    policy_factory = PowerOfTwoChoicesPolicy


class TestRoundRobin(RoutingPolicyContract):
    policy_factory = RoundRobinPolicy


class StaleMembersPolicy(ConsistentHashPolicy):
    """Planted bug: walks its own ring, ignoring which replicas the router says are eligible."""

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate],
               count: int) -> Choice:
        assert request.key is not None
        return Choice(tuple(self.ring.walk(request.key))[:count])


class ModuloPolicy(StatelessPolicy):
    """Planted bug for ``stable``: hash modulo the number of replicas."""

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate],
               count: int) -> Choice:
        key = request.key if isinstance(request.key, bytes) else str(request.key).encode()
        start = xxhash.xxh3_64_intdigest(key) % len(candidates)
        order = [*candidates[start:], *candidates[:start]]
        return Choice(tuple(c.name for c in order[:count]))


def test_policy_choosing_an_ejected_replica_fails() -> None:
    kit = routing_policy_contract(StaleMembersPolicy)()
    with pytest.raises(InvariantViolationError, match="always a healthy replica"):
        kit.test_always_a_routable_replica()


def test_unbounded_policy_promising_a_bound_fails() -> None:
    kit = routing_policy_contract(lambda: ConsistentHashPolicy(load_factor=None),
                                  load_factor=1.25)()
    with pytest.raises(InvariantViolationError, match="bounded load"):
        kit.test_bounded_load()


def test_modulo_hashing_promising_stability_fails() -> None:
    kit = routing_policy_contract(ModuloPolicy, stable=True)()
    with pytest.raises(InvariantViolationError, match="stable key -> replica"):
        kit.test_stable_under_membership_change()
