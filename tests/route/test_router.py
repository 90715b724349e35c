"""Router: routing keys, health filtering, fallbacks, policies, events, bad input."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.kv.hashing import extend_block_hashes, get_hash_fn
from servekit.metrics import Hook, HookSet
from servekit.metrics.events import RouteDecision
from servekit.route import (
    Candidate,
    Choice,
    ConsistentHashPolicy,
    HashRing,
    HealthTracker,
    LeastLoadedPolicy,
    NoNodeAvailableError,
    PowerOfTwoChoicesPolicy,
    PrefixKey,
    ReplicaLoad,
    RoundRobinPolicy,
    Router,
    RouteRequest,
    RoutingPolicy,
    StatelessPolicy,
)
from servekit.route.errors import (
    DuplicateNodeError,
    InvalidRouteParameterError,
    MissingRouteKeyError,
    UnknownNodeError,
)
from servekit.route.health import NodeHealth

REPLICAS = [f"r{i}" for i in range(6)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def small_router(**kwargs: object) -> Router:
    kwargs.setdefault("policy", ConsistentHashPolicy(vnodes=64))
    return Router(REPLICAS, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=40)
@given(
    down=st.sets(st.sampled_from(REPLICAS), max_size=5),
    session=st.text(min_size=1, max_size=8),
    fallbacks=st.integers(0, 6),
)
def test_choice_and_fallbacks_are_distinct_and_skip_unhealthy(
    down: set[str], session: str, fallbacks: int
) -> None:
    router = small_router(num_fallbacks=fallbacks)
    for node in down:
        router.health.mark_down(node)
    route = router.route(session_id=session)
    chosen = (route.node, *route.fallbacks)
    assert len(set(chosen)) == len(chosen) == min(1 + fallbacks, len(REPLICAS) - len(down))
    assert not set(chosen) & down
    if not down:  # nothing in flight, nothing down: the key's owner on the ring
        assert route.node == HashRing(REPLICAS, vnodes=64).lookup(session)
        assert route.position == 0


def test_exclude_routes_a_retry_elsewhere() -> None:
    router = small_router()
    first = router.route(session_id="s")
    router.release(first.node, success=False)
    retry = router.route(session_id="s", exclude={first.node})
    assert retry.node != first.node
    assert retry.node == first.fallbacks[0]


def test_key_precedence_and_prefix_key_matches_the_kv_cache() -> None:
    router = small_router(prefix=PrefixKey(block_size=4, num_blocks=2))
    tokens = list(range(20))
    kv: list[int] = []
    extend_block_hashes(kv, tokens, 4, 2, None, get_hash_fn("xxhash"))
    assert router.routing_key(token_ids=tokens) == (
        kv[-1].to_bytes(8, "little"),
        f"prefix:{kv[-1]:015x}",
    )
    assert router.routing_key(session_id="s", token_ids=tokens, api_key="k") == ("s", "session:s")
    key = router.routing_key(api_key="secret")
    assert key is not None and key[0] == "secret" and "secret" not in key[1]
    assert router.routing_key(token_ids=[1, 2, 3]) is None  # shorter than a block
    assert router.routing_key(token_ids=[1, 2, 3], api_key="k") == router.routing_key(api_key="k")
    only_api = Router(REPLICAS, key_order=("api_key",))
    assert only_api.routing_key(session_id="s", token_ids=tokens) is None


@settings(max_examples=25)
@given(
    tail_a=st.lists(st.integers(0, 999), max_size=10),
    tail_b=st.lists(st.integers(0, 999), max_size=10),
)
def test_same_leading_blocks_route_to_the_same_replica(
    tail_a: list[int], tail_b: list[int]
) -> None:
    router = small_router(
        prefix=PrefixKey(block_size=4, num_blocks=2),
        policy=ConsistentHashPolicy(load_factor=None, vnodes=64),
    )
    head = list(range(100, 108))
    a = router.route(token_ids=head + tail_a)
    b = router.route(token_ids=head + tail_b)
    assert a.node == b.node and a.key == b.key
    salted = router.routing_key(token_ids=head, cache_salt="tenant-1")
    assert salted is not None and salted[1] != a.key


def test_release_feeds_health_and_half_open_probe() -> None:
    clock = FakeClock()
    router = small_router(
        health=HealthTracker(failure_threshold=2, cooldown=5.0, clock=clock), clock=clock
    )
    node = router.route(session_id="s").node
    router.release(node, success=False)
    router.acquire(node)
    router.release(node, success=False)
    assert router.health.state(node) is NodeHealth.EJECTED
    assert router.route(session_id="s").node != node
    clock.now = 5.0
    probe = router.route(session_id="s")
    assert probe.node == node and router.health.state(node) is NodeHealth.PROBING
    assert router.route(session_id="s").node != node  # one probe at a time
    router.release(node, success=True)
    assert router.health.state(node) is NodeHealth.UP
    router.acquire(node)
    router.release(node, success=None)  # no signal
    assert router.health.failures(node) == 0


def test_events_reach_hooks() -> None:
    seen: list[RouteDecision] = []

    class Recorder(Hook):
        def on_route(self, event: RouteDecision) -> None:
            seen.append(event)

    clock = FakeClock()
    clock.now = 3.0
    router = small_router(hooks=HookSet([Recorder()]), clock=clock)
    route = router.route(session_id="abc")
    assert seen == [RouteDecision("session:abc", route.node, 0, 3.0)]
    small_router(hooks=HookSet()).route(session_id="abc")  # nobody listens: no event built
    assert len(seen) == 1


def test_least_loaded_policy() -> None:
    router = Router({"a": 1.0, "b": 2.0, "c": 1.0}, policy=LeastLoadedPolicy())
    picks = [router.route().node for _ in range(8)]
    assert router.loads == {"a": 2, "b": 4, "c": 2}  # load per unit of weight evened out
    assert picks[:3] == ["a", "b", "c"]


def test_power_of_two_choices_uses_the_injected_rng() -> None:
    a = Router(REPLICAS, policy=PowerOfTwoChoicesPolicy(random.Random(7)))
    b = Router(REPLICAS, policy=PowerOfTwoChoicesPolicy(random.Random(7)))
    picks = [a.route().node for _ in range(30)]
    assert picks == [b.route().node for _ in range(30)]
    model, loads = random.Random(7), dict.fromkeys(REPLICAS, 0)
    for pick in picks:  # each pick is the less loaded of the two drawn (ties: the first)
        x, y = model.sample(REPLICAS, 2)
        assert pick == (y if loads[y] < loads[x] else x)
        loads[pick] += 1
    candidates = [Candidate("x", 1.0, in_flight=5), Candidate("y", 1.0, in_flight=1)]
    choice = PowerOfTwoChoicesPolicy(random.Random(0)).choose(RouteRequest(None), candidates, 2)
    assert choice.nodes == ("y", "x")


def test_round_robin_policy_skips_unhealthy() -> None:
    router = Router(["a", "b", "c"], policy=RoundRobinPolicy(), num_fallbacks=1)
    assert [router.route().node for _ in range(4)] == ["a", "b", "c", "a"]
    router.health.mark_down("b")
    routes = [router.route() for _ in range(4)]
    assert "b" not in {r.node for r in routes} | {f for r in routes for f in r.fallbacks}


def test_custom_policy_through_the_protocol() -> None:
    class Last(StatelessPolicy):
        def choose(
            self, request: RouteRequest, candidates: Sequence[Candidate], count: int
        ) -> Choice:
            return Choice(tuple(c.name for c in reversed(candidates))[:count])

    assert isinstance(Last(), RoutingPolicy)
    router = Router(["a", "b", "c"], policy=Last())
    route = router.route()
    assert (route.node, route.fallbacks) == ("c", ("b", "a"))


def test_membership_changes_reach_the_policy() -> None:
    policy = ConsistentHashPolicy(vnodes=32)
    router = Router(["a", "b"], policy=policy)
    router.add_replica("c", 2.0)
    router.set_weight("a", 0.5)
    router.remove_replica("b")
    assert policy.ring.nodes == ("a", "c") and policy.ring.weight("a") == 0.5
    assert router.replicas == ("a", "c")
    assert "b" not in router.health


def test_bad_input() -> None:
    router = small_router()
    with pytest.raises(DuplicateNodeError):
        router.add_replica("r0")
    with pytest.raises(InvalidRouteParameterError, match="weight"):
        router.add_replica("x", 0)
    assert "x" not in router.replicas
    with pytest.raises(UnknownNodeError):
        router.remove_replica("x")
    with pytest.raises(UnknownNodeError):
        router.release("x")
    with pytest.raises(InvalidRouteParameterError, match="in flight"):
        router.release("r0")
    with pytest.raises(MissingRouteKeyError):
        router.route()
    with pytest.raises(InvalidRouteParameterError, match="key_order"):
        Router(key_order=("session", "cookie"))
    with pytest.raises(InvalidRouteParameterError, match="num_fallbacks"):
        Router(num_fallbacks=-1)
    with pytest.raises(InvalidRouteParameterError, match="block_size"):
        PrefixKey(block_size=0)
    with pytest.raises(NoNodeAvailableError):
        Router().route(session_id="s")
    for node in REPLICAS:
        router.health.mark_down(node)
    with pytest.raises(NoNodeAvailableError):
        router.route(session_id="s")


def test_route_does_not_import_torch() -> None:
    code = "import sys, servekit.route; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_policy_sees_the_request_and_each_replicas_state() -> None:
    seen: list[tuple[RouteRequest, list[Candidate]]] = []

    class Recording(StatelessPolicy):
        def choose(
            self, request: RouteRequest, candidates: Sequence[Candidate], count: int
        ) -> Choice:
            seen.append((request, list(candidates)))
            return Choice((candidates[0].name,))

    class Index:
        def __init__(self) -> None:
            self.asked: list[tuple[int, ...]] = []

        def cached_blocks(self, block_hashes: Sequence[int]) -> dict[str, int]:
            self.asked.append(tuple(block_hashes))
            return {"b": 2, "c": 1}

    index = Index()
    router = Router({"a": 1.0, "b": 2.0, "c": 1.0}, policy=Recording(), index=index,
                    prefix=PrefixKey(block_size=4, num_blocks=1))
    router.report_load("b", ReplicaLoad(running=3, waiting=1, kv_usage=0.5))
    router.health.mark_down("c")
    tokens = list(range(10))  # two full blocks of 4
    route = router.route(token_ids=tokens, tenant="acme")
    request, candidates = seen[-1]
    assert route.node == "a"
    assert request.tenant == "acme" and request.key == PrefixKey(4, 1).key(tokens)
    assert request.block_hashes == PrefixKey(4, 1).block_hashes(tokens)
    assert len(request.block_hashes) == 2 and index.asked == [request.block_hashes]
    assert [c.name for c in candidates] == ["a", "b"]  # c is down: never a candidate
    a, b = candidates
    assert (a.weight, a.health, a.in_flight, a.load, a.cached_blocks) == (
        1.0, NodeHealth.UP, 0, None, 0)
    assert (b.weight, b.load, b.cached_blocks) == (2.0, ReplicaLoad(3, 1, 0.5), 2)
    assert b.load_estimate == 4 and a.load_estimate == 0
    router.route(block_hashes=[7, 8, 9], session_id="s")
    assert seen[-1][0].block_hashes == (7, 8, 9) and seen[-1][1][0].in_flight == 1
    assert router.reported_load("b") == ReplicaLoad(3, 1, 0.5)
    with pytest.raises(InvalidRouteParameterError, match="kv_usage"):
        ReplicaLoad(running=0, waiting=0, kv_usage=1.5)
    with pytest.raises(InvalidRouteParameterError, match="running"):
        ReplicaLoad(running=-1, waiting=0, kv_usage=0.0)


def test_built_in_policies_weigh_the_replicas_reported_load() -> None:
    router = Router(["a", "b"], policy=LeastLoadedPolicy())
    router.report_load("a", ReplicaLoad(running=10, waiting=5, kv_usage=0.9))
    assert router.route().node == "b"  # this router sent a nothing, but a reports 15
    ring = Router(["a", "b"], policy=ConsistentHashPolicy(load_factor=1.0), num_fallbacks=1)
    owner = ring.route(session_id="s").node
    ring.release(owner)
    other = "b" if owner == "a" else "a"
    ring.report_load(owner, ReplicaLoad(running=8, waiting=0, kv_usage=0.5))
    assert ring.route(session_id="s").node == other  # the owner is over its bound


def test_routing_policies_resolve_by_name_and_spec() -> None:
    assert isinstance(Router(["a"], policy="round_robin").policy, RoundRobinPolicy)
    router = Router(["a"], policy='consistent_hash:{"load_factor": 2.0, "vnodes": 8}')
    assert isinstance(router.policy, ConsistentHashPolicy) and router.policy.load_factor == 2.0
    from servekit.plugins import PluginArgumentError, UnknownPluginError

    with pytest.raises(UnknownPluginError, match=r"no routing_policy plugin named 'nope'"):
        Router(["a"], policy="nope")
    with pytest.raises(PluginArgumentError, match=r"round_robin.*bogus"):
        Router(["a"], policy='round_robin:{"bogus": 1}')
