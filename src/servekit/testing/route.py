"""The routing-policy kit: a real :class:`~servekit.route.Router` with your policy, through
membership changes, ejections, manual downs, reported loads and in-flight counts::

    class TestMyPolicy(RoutingPolicyContract):
        policy_factory = MyPolicy
        load_factor = 1.25   # promise: no replica above ceil(c * (total + 1) * share)
        stable = True        # promise: a key moves only to or from the replica that changed

Every policy must always answer with routable replicas (never an ejected, down or excluded
one), distinct, at most ``count``. The other checks run only for the promises it declares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.route.bounded import capacity
from servekit.route.errors import NoNodeAvailableError
from servekit.route.health import HealthTracker
from servekit.route.policy import ReplicaLoad, RoutingPolicy
from servekit.route.router import Router
from servekit.testing._check import check, check_interface
from servekit.testing._run import kit_settings, run_given
from servekit.testing.clock import FakeClock

PolicyFactory = Callable[[], RoutingPolicy]
NODES = tuple(f"replica-{i}" for i in range(8))

_op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NODES), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
    st.tuples(st.just("remove"), st.sampled_from(NODES), st.just(0)),
    st.tuples(st.just("fail"), st.sampled_from(NODES), st.just(0)),
    st.tuples(st.just("down"), st.sampled_from(NODES), st.just(0)),
    st.tuples(st.just("up"), st.sampled_from(NODES), st.just(0)),
    st.tuples(st.just("weight"), st.sampled_from(NODES), st.sampled_from([0.5, 1.0, 4.0])),
    st.tuples(st.just("report"), st.sampled_from(NODES), st.integers(0, 20)),
    st.tuples(st.just("release"), st.sampled_from(NODES), st.booleans()),
    st.tuples(st.just("tick"), st.just(""), st.sampled_from([0.5, 3.0, 20.0])),
    st.tuples(st.just("route"), st.sampled_from([f"s{i}" for i in range(12)]),
              st.sampled_from(["", "x", "replica-1", "replica-2"])),
)


class RoutingPolicyContract:
    """Conformance tests for a routing policy; subclass with ``policy_factory`` and the
    promises it makes (``load_factor``, ``stable``). Options: ``max_examples``, ``seed``."""

    policy_factory: ClassVar[PolicyFactory]
    load_factor: ClassVar[float | None] = None
    stable: ClassVar[bool] = False
    max_examples: ClassVar[int] = 60
    seed: ClassVar[int | None] = None

    def make_policy(self) -> RoutingPolicy:
        """A fresh policy from ``policy_factory``."""
        factory = getattr(type(self), "policy_factory", None)
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set policy_factory")
        return factory()  # type: ignore[no-any-return]

    def _settings(self) -> settings:
        return kit_settings(type(self).max_examples, 1, type(self).seed)

    def test_implements_the_interface(self) -> None:
        """The policy implements RoutingPolicy at servekit's version."""
        check_interface(self.make_policy(), "routing_policy")

    def test_always_a_routable_replica(self) -> None:
        """Every route goes to a routable replica; fallbacks are routable, distinct, other."""

        @given(initial=st.lists(st.sampled_from(NODES), min_size=1, max_size=5, unique=True),
               ops=st.lists(_op, max_size=60))
        def healthy(initial: list[str], ops: list[tuple[str, str, Any]]) -> None:
            clock = FakeClock()
            health = HealthTracker(failure_threshold=1, cooldown=10.0, clock=clock)
            router = Router(initial, policy=self.make_policy(), health=health, clock=clock)
            for op, name, arg in ops:
                members = set(router.replicas)
                if op == "add" and name not in members:
                    router.add_replica(name, arg)
                elif op == "route":
                    _route_once(router, name, {arg} & members, clock())
                elif name not in members:
                    continue
                elif op == "remove" and len(members) > 1:
                    router.remove_replica(name)
                elif op == "fail":
                    health.record_failure(name)
                elif op == "down":
                    health.mark_down(name)
                elif op == "up":
                    health.mark_up(name)
                elif op == "weight":
                    router.set_weight(name, arg)
                elif op == "report":
                    router.report_load(name, ReplicaLoad(arg, arg // 2, min(1.0, arg / 20)))
                elif op == "release" and router.load(name) > 0:
                    router.release(name, arg)
                elif op == "tick":
                    clock.advance(arg)

        run_given(healthy, self._settings(), type(self).seed)

    def test_bounded_load(self) -> None:
        """With the promised ``load_factor`` c, no replica is chosen at or above
        ``ceil(c * (total + 1) * weight share)`` in-flight requests."""
        c = type(self).load_factor
        if c is None:
            return

        @given(weights=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=2, max_size=8),
               keys=st.lists(st.integers(0, 3), min_size=1, max_size=120),
               releases=st.lists(st.booleans(), max_size=120))
        def bounded(weights: list[float], keys: list[int], releases: list[bool]) -> None:
            nodes = {f"replica-{i}": w for i, w in enumerate(weights)}
            router = Router(nodes, policy=self.make_policy(), clock=FakeClock())
            total_weight = sum(weights)
            for i, key in enumerate(keys):  # a few hot keys: the worst case for affinity
                loads = router.loads
                total = sum(loads.values())
                node = router.route(session_id=f"hot-{key}").node
                cap = capacity(total, nodes[node] / total_weight, c)
                check(loads[node] < cap, "bounded load",
                      f"routed to {node} with {loads[node]} in flight, capacity {cap} "
                      f"(c={c}, total {total}, weights {weights})")
                if i < len(releases) and releases[i]:
                    router.release(node)

        run_given(bounded, self._settings(), type(self).seed)

    def test_stable_under_membership_change(self) -> None:
        """A replica joining takes keys only for itself; one leaving moves only its own keys."""
        if not type(self).stable:
            return

        @given(n=st.integers(2, 8), leaving=st.integers(0, 7))
        def stable(n: int, leaving: int) -> None:
            names = [f"replica-{i}" for i in range(n)]
            router = Router(names, policy=self.make_policy(), clock=FakeClock())
            keys = [f"key-{i}" for i in range(200)]
            before = _owners(router, keys)
            router.add_replica("joined")
            after = _owners(router, keys)
            moved = [k for k in keys if after[k] != before[k]]
            check(all(after[k] == "joined" for k in moved), "stable key -> replica",
                  f"keys moved between old replicas when one joined: "
                  f"{[(k, before[k], after[k]) for k in moved if after[k] != 'joined'][:5]}")
            gone = names[leaving % n]
            router.remove_replica(gone)
            final = _owners(router, keys)
            moved = [k for k in keys if final[k] != after[k]]
            check(all(after[k] == gone for k in moved), "stable key -> replica",
                  f"keys not on {gone} moved when it left: {moved[:5]}")

        run_given(stable, self._settings(), type(self).seed)


def _owners(router: Router, keys: list[str]) -> dict[str, str]:
    owners = {}
    for key in keys:
        node = router.route(session_id=key).node
        router.release(node, None)
        owners[key] = node
    return owners


def _route_once(router: Router, session: str, exclude: set[str], now: float) -> None:
    routable = {n for n in router.replicas if n not in exclude and router.health.routable(n, now)}
    try:
        route = router.route(session_id=session, exclude=exclude)
    except NoNodeAvailableError:
        check(not routable, "always a healthy replica",
              f"NoNodeAvailableError with routable replicas {sorted(routable)}")
        return
    check(route.node in routable, "always a healthy replica",
          f"chose {route.node!r}, routable are {sorted(routable)} "
          f"(health {[(n, router.health.state(n).name) for n in router.replicas]})")
    chosen = (route.node, *route.fallbacks)
    check(len(set(chosen)) == len(chosen), "fallbacks are distinct", f"{chosen}")
    check(set(route.fallbacks) <= routable, "always a healthy replica",
          f"fallbacks {route.fallbacks} include an unroutable replica; routable "
          f"{sorted(routable)}")
    check(len(chosen) <= 1 + router.num_fallbacks, "at most count replicas", f"{chosen}")


def routing_policy_contract(policy_factory: PolicyFactory,
                            **options: Any) -> type[RoutingPolicyContract]:
    """A :class:`RoutingPolicyContract` subclass for ``policy_factory`` (assign it to a
    ``Test*`` name); ``options`` set ``load_factor``, ``stable``, ``max_examples``, ``seed``."""
    return type("TestRoutingPolicy", (RoutingPolicyContract,),
                {"policy_factory": staticmethod(policy_factory), **options})
