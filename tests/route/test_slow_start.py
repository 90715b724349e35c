"""Slow start: a replica whose breaker just closed gets a share of new requests that grows over
the window, instead of its full share at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.route import HealthTracker, Router
from servekit.route.errors import InvalidRouteParameterError
from servekit.route.router import SLOW_START_FLOOR
from servekit.testing import FakeClock


def _fleet(slow_start: float, policy: str = "least_loaded") -> tuple[Router, FakeClock]:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=1, cooldown=1.0, clock=clock)
    router = Router(["a", "b"], policy=policy, health=health, clock=clock,
                    slow_start=slow_start)
    router.route(exclude={"b"})  # "a" fails once: ejected
    router.release("a", success=False)
    clock.advance(1.0)
    router.route(exclude={"b"})  # its half-open probe succeeds: back UP now
    router.release("a", success=True)
    assert router.health.up_for("a") == 0.0 and router.health.up_for("b") is None
    return router, clock


def _share_of_a(router: Router, n: int = 40) -> float:
    """Fraction of ``n`` concurrent requests (none released) routed to "a"."""
    got = [router.route().node for _ in range(n)]
    for node in got:
        router.release(node)
    return got.count("a") / n


def test_a_returning_replica_ramps_up_over_the_window() -> None:
    router, clock = _fleet(slow_start=10.0)
    assert _share_of_a(router) <= 0.15  # weight 0.1 of b's: about 1 in 11
    clock.advance(5.0)
    assert 0.25 <= _share_of_a(router) <= 0.4  # half its weight: about 1 in 3
    clock.advance(5.0)
    assert _share_of_a(router) == 0.5  # the window is over: an even split


def test_without_slow_start_it_gets_its_full_share_at_once() -> None:
    router, _ = _fleet(slow_start=0.0)
    assert _share_of_a(router) == 0.5


def test_marked_up_again_also_ramps() -> None:
    clock = FakeClock()
    router = Router(["a", "b"], policy="least_loaded", clock=clock, slow_start=10.0,
                    health=HealthTracker(clock=clock))
    assert _share_of_a(router) == 0.5  # UP since added: no ramp
    router.health.mark_down("a")
    router.health.mark_up("a")
    assert _share_of_a(router) <= 0.15


@settings(max_examples=50, deadline=None)
@given(elapsed=st.floats(0, 30), window=st.floats(0.1, 20), weight=st.floats(0.1, 10))
def test_ramped_weight_is_bounded_and_monotonic(elapsed: float, window: float,
                                                weight: float) -> None:
    router, clock = _fleet(slow_start=window)
    clock.advance(elapsed)
    w = router._ramped("a", weight, clock())
    assert weight * SLOW_START_FLOOR <= w <= weight
    assert w <= router._ramped("a", weight, clock() + 0.1)  # never shrinks as time passes
    if elapsed > window + 1e-6:
        assert w == weight


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), True, "5"])
def test_bad_window_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRouteParameterError, match="slow_start"):
        Router(["a"], slow_start=bad)  # type: ignore[arg-type]
