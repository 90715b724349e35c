"""Invariants of the bucket math and the limiter on a fake clock (hypothesis)."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from servekit.limit import Limit, LimitConfigError, Limiter, MemoryStore, Reservation, TokenBucket
from servekit.limit.errors import StoreFullError


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


capacities = st.floats(1.0, 1000.0)
rates = st.floats(0.01, 1000.0)


@settings(max_examples=60)
@given(
    capacity=capacities,
    rate=rates,
    ops=st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 1.0)), min_size=1, max_size=50),
)
def test_window_bound(capacity: float, rate: float, ops: list[tuple[float, float]]) -> None:
    """Over any window [t_i, t_j] the admitted cost is <= capacity + rate * (t_j - t_i)."""
    clock = FakeClock(100.0)
    limiter = Limiter([Limit("x", capacity, rate)], clock=clock)
    admitted: list[tuple[float, float]] = []
    for dt, fraction in ops:
        clock.now += dt
        cost = fraction * capacity
        if limiter.try_acquire("k", cost).allowed:
            admitted.append((clock.now, cost))
    for i in range(len(admitted)):
        total = 0.0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            bound = capacity + rate * (admitted[j][0] - admitted[i][0])
            assert total <= bound * (1 + 1e-8) + 1e-9


@settings(max_examples=60)
@given(
    capacity=st.integers(1, 200),
    rate=st.sampled_from([0.5, 1.0, 2.0, 4.0, 16.0, 64.0, 250.0]),
    steps=st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_greedy_client_gets_exactly_the_bound(capacity: int, rate: float, steps: list[int]) -> None:
    """A client that takes every token as soon as it exists gets floor(C + r * T) by time T."""
    clock = FakeClock(0.0)
    limiter = Limiter([Limit("x", capacity, rate)], clock=clock)
    bucket = TokenBucket(Limit("x", capacity, rate), clock)
    admitted = in_bucket = 0
    for step in [0, *steps]:
        dt = min(step / 8, (capacity - 1) / rate) if capacity > 1 else 0.0  # never overflows
        clock.now += dt
        while limiter.try_acquire("k").allowed:
            admitted += 1
        while bucket.try_take():
            in_bucket += 1
        assert admitted == in_bucket == math.floor(capacity + rate * clock.now + 1e-9)


@settings(max_examples=40)
@given(
    caps=st.lists(st.integers(1, 50), min_size=2, max_size=3),
    ops=st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 50), min_size=3,
                                                       max_size=3)), max_size=40),
)
def test_multi_limit_atomicity(caps: list[int], ops: list[tuple[int, list[int]]]) -> None:
    """A check charges every limit or none: a denial leaves every bucket exactly as it was."""
    clock = FakeClock(10.0)
    names = [f"l{i}" for i in range(len(caps))]
    limiter = Limiter([Limit(n, c, 2.0) for n, c in zip(names, caps, strict=False)], clock=clock)
    for dt, raw in ops:
        clock.now += dt / 4
        cost = {n: min(c, v) for n, c, v in zip(names, caps, raw, strict=False)}
        before = limiter.peek("k").statuses
        decision = limiter.try_acquire("k", cost)
        after = limiter.peek("k").statuses
        if decision.allowed:
            for b, a, n in zip(before, after, names, strict=False):
                assert a.remaining == pytest.approx(b.remaining - cost[n], abs=1e-9)
        else:
            assert decision.denied_by
            assert before == after
            for n in decision.denied_by:
                assert before[names.index(n)].remaining < cost[n]


class ReserveSettleMachine(RuleBasedStateMachine):
    """Reserve/settle/acquire against a model bucket kept as "tokens now" (another encoding)."""

    CAPS: ClassVar[dict[str, float]] = {"requests": 8.0, "tokens": 64.0}
    RATES: ClassVar[dict[str, float]] = {"requests": 0.5, "tokens": 4.0}

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(50.0)
        self.limiter = Limiter(
            [Limit(n, self.CAPS[n], self.RATES[n]) for n in self.CAPS],
            clock=self.clock,
            reservation_ttl=16.0,
            store=MemoryStore(max_keys=4),
        )
        self.tokens = dict(self.CAPS)
        self.open: list[tuple[Reservation, dict[str, float], float]] = []

    def _admits(self, cost: dict[str, float]) -> bool:
        return all(self.tokens[n] - cost[n] >= 0 for n in self.CAPS)

    @rule(dt=st.integers(0, 16))
    def advance(self, dt: int) -> None:
        self.clock.now += dt / 4
        for n in self.CAPS:
            self.tokens[n] = min(self.CAPS[n], self.tokens[n] + self.RATES[n] * dt / 4)
        self.open = [o for o in self.open if o[2] > self.clock.now]  # expired: charge stands

    @rule(req=st.integers(0, 8), tok=st.integers(0, 64), reserve=st.booleans())
    def acquire(self, req: int, tok: int, reserve: bool) -> None:
        cost = {"requests": float(req), "tokens": float(tok)}
        decision = self.limiter.try_acquire("k", cost, reserve=reserve)
        assert decision.allowed == self._admits(cost)
        if decision.allowed:
            for n in self.CAPS:
                self.tokens[n] -= cost[n]
            if reserve:
                assert decision.reservation is not None
                self.open.append((decision.reservation, cost, self.clock.now + 16.0))

    @rule(index=st.integers(0, 100), used=st.integers(0, 128))
    def settle(self, index: int, used: int) -> None:
        if not self.open:
            return
        res, cost, _ = self.open.pop(index % len(self.open))
        actual = {"requests": 1.0, "tokens": float(used)}
        assert self.limiter.settle(res, actual)
        for n in self.CAPS:  # refund up to full, or charge into debt
            self.tokens[n] = min(self.CAPS[n], self.tokens[n] + cost[n] - actual[n])

    @invariant()
    def buckets_match_model(self) -> None:
        for status in self.limiter.peek("k").statuses:
            assert status.remaining == pytest.approx(max(0.0, self.tokens[status.name]),
                                                     abs=1e-9)
        assert self.limiter.open_reservations == len(self.open)


TestReserveSettle = ReserveSettleMachine.TestCase
TestReserveSettle.settings = settings(max_examples=40, stateful_step_count=30)


@settings(max_examples=30)
@given(costs=st.lists(st.integers(0, 20), min_size=1, max_size=30))
def test_reserve_settle_conserves_tokens(costs: list[int]) -> None:
    """At a fixed time, reserving c and settling with u leaves exactly u charged."""
    clock = FakeClock(0.0)
    limiter = Limiter([Limit("tokens", 1000, 1.0)], clock=clock)
    charged = 0
    for c in costs:
        d = limiter.try_acquire("k", c, reserve=True)
        assert d.reservation is not None
        used = c // 2 if c % 3 else c + 5
        limiter.settle(d.reservation, used)
        charged += used
    assert limiter.peek("k").status("tokens").remaining == pytest.approx(1000 - charged)


def test_idle_keys_are_dropped_only_when_full() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(max_keys=3)
    limiter = Limiter([Limit("r", 2, 1.0)], clock=clock, store=store)
    for key in "abc":
        assert limiter.try_acquire(key).allowed  # each bucket needs 1 s to be full again
    with pytest.raises(StoreFullError, match="raise max_keys"):
        limiter.try_acquire("d")
    assert len(store) == 3 and limiter.peek("a").status("r").remaining == 1  # nothing lost
    clock.now = 0.5
    with pytest.raises(StoreFullError):  # no rescan before the earliest key can be full
        limiter.try_acquire("d")
    clock.now = 1.0  # a, b, c are full: dropping one changes no decision
    assert limiter.try_acquire("d").allowed
    assert len(store) == 3


def test_dropping_full_keys_never_changes_a_decision() -> None:
    """A tiny store and a big one see the same decisions for the same traffic."""
    clock = FakeClock(0.0)
    small = Limiter([Limit("r", 3, 2.0)], clock=clock, store=MemoryStore(max_keys=8))
    big = Limiter([Limit("r", 3, 2.0)], clock=clock)
    for step in range(400):
        clock.now += 0.05
        key = f"k{(step * 7) % 40}"
        try:
            got = small.try_acquire(key).allowed
        except StoreFullError:
            continue
        assert got == big.try_acquire(key).allowed


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Limit("x", 10, 0), "Limit.rate must be a finite number > 0"),
        (lambda: Limit("x", 10, -1), "Limit.rate"),
        (lambda: Limit("x", 0, 1), "Limit.capacity"),
        (lambda: Limit("", 1, 1), "Limit.name"),
        (lambda: Limit.per_period("x", 5, 0), "period"),
        (lambda: Limit("x", "abc", 1), "Limit.capacity must be a finite number > 0, got 'abc'"),
        (lambda: Limit("x", 1, "abc"), "Limit.rate"),
        (lambda: Limit("x", None, 1), "Limit.capacity"),
        (lambda: Limit("x", True, 1), "Limit.capacity"),
        (lambda: Limit("x", 1, float("nan")), "Limit.rate"),
        (lambda: Limit("x", float("inf"), 1), "Limit.capacity"),
        (lambda: Limit(None, 1, 1), "Limit.name"),  # type: ignore[arg-type]
        (lambda: Limit.per_minute("x", "abc"), "Limit amount"),
        (lambda: Limit.per_period("x", 5, None), "Limit period"),
        (lambda: Limiter([Limit("x", 1, 1), Limit("x", 2, 1)]), "unique"),
        (lambda: Limiter([]), "at least one"),
        (lambda: Limiter([Limit("x", 1, 1)], max_waiters=-1), "max_waiters"),
        (lambda: Limiter([Limit("x", 1, 1)], max_wait="5"), "max_wait"),
        (lambda: Limiter([Limit("x", 1, 1)], reservation_ttl=float("nan")), "reservation_ttl"),
        (lambda: MemoryStore(max_keys=0), "max_keys"),
    ],
)
def test_bad_config(make: object, match: str) -> None:
    with pytest.raises(LimitConfigError, match=match):
        make()  # type: ignore[operator]
