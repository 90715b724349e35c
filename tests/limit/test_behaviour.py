"""The behavioural suite, run against the memory store and a real Redis alike."""

from __future__ import annotations

import time

import anyio
import pytest

from servekit.limit import Limit, Limiter, RateLimitExceededError, Store, openai_headers
from servekit.limit.errors import InvalidCostError, RequestTooLargeError, ReservationError
from servekit.metrics import events, hooks

# Per-day limits: refill during a test (<= 1 s) is < 1e-3 tokens, so counts are exact.
RPD = Limit.per_day("requests", 5)
TPD = Limit.per_day("tokens", 1000)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def remaining(limiter: Limiter, key: str) -> dict[str, float]:
    return {s.name: s.remaining for s in limiter.peek(key).statuses}


def test_burst_then_deny(store: Store) -> None:
    limiter = Limiter([RPD], store=store)
    decisions = [limiter.try_acquire("k") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    denied = decisions[-1]
    assert denied.denied_by == ("requests",)
    assert 86400 / 5 * 0.99 < denied.retry_after <= 86400 / 5
    assert limiter.try_acquire("other").allowed  # keys are independent


def test_multi_limit_all_or_nothing(store: Store) -> None:
    limiter = Limiter([RPD, TPD], store=store)
    assert limiter.try_acquire("k", {"requests": 1, "tokens": 900}).allowed
    before = remaining(limiter, "k")
    denied = limiter.try_acquire("k", {"requests": 1, "tokens": 200})
    assert not denied.allowed and denied.denied_by == ("tokens",)
    after = remaining(limiter, "k")
    assert after["requests"] == pytest.approx(before["requests"], abs=1e-3)  # not charged
    assert after["tokens"] == pytest.approx(before["tokens"], abs=1e-3)
    assert after["requests"] == pytest.approx(4, abs=1e-3)


def test_reserve_then_settle_refunds_and_charges(store: Store) -> None:
    limiter = Limiter([RPD, TPD], store=store)
    d = limiter.try_acquire("k", {"requests": 1, "tokens": 600}, reserve=True)
    assert d.reservation is not None and limiter.open_reservations == 1
    assert limiter.settle(d.reservation, {"requests": 1, "tokens": 150})
    assert limiter.open_reservations == 0
    assert remaining(limiter, "k")["tokens"] == pytest.approx(850, abs=1e-2)
    d2 = limiter.try_acquire("k", {"requests": 1, "tokens": 100}, reserve=True)
    assert d2.reservation is not None
    assert limiter.settle(d2.reservation, {"requests": 1, "tokens": 1100})  # over: charged
    assert remaining(limiter, "k")["tokens"] == 0  # in debt, reported as 0
    assert not limiter.try_acquire("k", {"requests": 1, "tokens": 0}).allowed
    with pytest.raises(ReservationError):
        limiter.settle(d2.reservation, 0)


def test_unsettled_reservation_expires(store: Store) -> None:
    clock = FakeClock()
    limiter = Limiter([TPD], store=store, clock=clock, reservation_ttl=30.0)
    d = limiter.try_acquire("k", 400, reserve=True)
    assert d.reservation is not None
    clock.now += 31
    assert limiter.open_reservations == 0
    assert limiter.settle(d.reservation, 0) is False  # expired: its charge stands
    tokens = limiter.peek("k").status("tokens").remaining
    if store.__class__.__name__ == "MemoryStore":  # refilled 31 s worth on the fake clock
        assert tokens == pytest.approx(600 + 31 * 1000 / 86400)
    else:  # Redis keeps the server's time
        assert tokens == pytest.approx(600, abs=1e-2)


def test_shadow_mode_never_blocks_and_charges_only_conforming(store: Store) -> None:
    seen: list[events.RateLimitDecision] = []

    class Recorder(hooks.Hook):
        def on_rate_limit(self, event: events.RateLimitDecision) -> None:
            seen.append(event)

    limiter = Limiter([RPD], store=store, shadow=True, hooks=hooks.HookSet([Recorder()]))
    decisions = [limiter.try_acquire("k") for _ in range(8)]
    assert all(d.allowed for d in decisions)
    assert [d.conforming for d in decisions] == [True] * 5 + [False] * 3
    assert [e.allowed for e in seen] == [True] * 5 + [False] * 3
    assert all(e.shadow and e.key == "k" for e in seen)
    assert remaining(limiter, "k")["requests"] == pytest.approx(0, abs=1e-3)


def test_headers(store: Store) -> None:
    limiter = Limiter([Limit.per_minute("requests", 60), Limit.per_minute("tokens", 1000)],
                      store=store)
    ok = limiter.try_acquire("k", {"requests": 1, "tokens": 900})
    h = openai_headers(ok)
    assert h["x-ratelimit-limit-requests"] == "60"
    assert h["x-ratelimit-remaining-requests"] == "59"
    assert h["x-ratelimit-reset-requests"] in {"1s", "999ms", "998ms"}
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] in {"100", "101"}
    assert h["x-ratelimit-reset-tokens"] in {"54s", "53.999s", "53.998s"}
    assert "retry-after" not in h
    denied = openai_headers(limiter.try_acquire("k", {"requests": 1, "tokens": 900}))
    assert denied["retry-after"] == "48"
    assert 47_900 < int(denied["retry-after-ms"]) <= 48_000


def test_bad_input(store: Store) -> None:
    limiter = Limiter([RPD, TPD], store=store)
    with pytest.raises(InvalidCostError, match="must be finite and >= 0"):
        limiter.try_acquire("k", -1)
    with pytest.raises(InvalidCostError, match="unknown limit 'tokns'"):
        limiter.try_acquire("k", {"tokns": 5})
    with pytest.raises(InvalidCostError, match="'tokens'"):
        limiter.try_acquire("k", {"tokens": float("nan")})
    with pytest.raises(RequestTooLargeError, match="capacity 1000 of limit 'tokens'"):
        limiter.try_acquire("k", {"tokens": 1001})
    assert remaining(limiter, "k") == {"requests": 5, "tokens": 1000}


def test_async_acquire_waits_then_succeeds(store: Store) -> None:
    limiter = Limiter([Limit("requests", 2, 40.0)], store=store)

    async def main() -> list[bool]:
        return [(await limiter.acquire("k", max_wait=1.0)).allowed for _ in range(6)]

    t0 = time.monotonic()
    assert anyio.run(main) == [True] * 6
    assert time.monotonic() - t0 >= (6 - 2) / 40 * 0.9


def test_async_acquire_fails_fast_when_the_wait_is_too_long(store: Store) -> None:
    limiter = Limiter([RPD], store=store)

    async def main() -> None:
        for _ in range(5):
            await limiter.acquire("k")
        with pytest.raises(RateLimitExceededError) as info:
            await limiter.acquire("k", max_wait=5.0)
        assert info.value.reason == "limit" and info.value.retry_after > 5.0
        assert info.value.decision.denied_by == ("requests",)

    anyio.run(main)
    assert limiter.num_waiters == 0
