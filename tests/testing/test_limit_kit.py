"""The limiter-store kit: memory and Redis stores pass it; planted bugs fail it by name."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import anyio
import pytest

from servekit.limit import MemoryStore, RedisStore, Store
from servekit.limit.bucket import LimitSet
from servekit.limit.store import TakeResult
from servekit.testing import InvariantViolationError
from servekit.testing.limit import LimiterStoreContract, limiter_store_contract
from tests.limit.conftest import RedisServer, _free_port


class TestMemoryStore(LimiterStoreContract):
    store_factory = MemoryStore


class TestRedisStore(LimiterStoreContract):
    max_examples = 15
    url: ClassVar[str] = ""

    @pytest.fixture(autouse=True)
    def _redis(self, redis_server: RedisServer) -> Iterator[None]:
        type(self).url = redis_server.url
        yield

    def make_store(self) -> Store:
        store: Store = RedisStore(self.url, timeout=1.0)
        return store

    def break_store(self, store: Store) -> Store:
        broken: Store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", timeout=0.2)
        return broken


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


class RacyStore(MemoryStore):
    """Planted bug: ``atake`` checks, yields to the event loop, then charges (check-then-act)."""

    async def atake(self, key: str, limits: LimitSet, costs: Sequence[float],
                    now: float) -> TakeResult:
        verdict = self.peek(key, limits, costs, now)
        await anyio.sleep(0)
        if not verdict[0]:
            return verdict
        return self.adjust(key, limits, costs, now)


class HalfChargingStore(MemoryStore):
    """Planted bug: charges the first limit even when a later one denies."""

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        result = super().take(key, limits, costs, now)
        if not result[0] and len(costs) > 1:
            super().adjust(key, limits, [costs[0]] + [0.0] * (len(costs) - 1), now)
        return result


class LeakyRefundStore(MemoryStore):
    """Planted bug: ``adjust`` doubles refunds."""

    def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float],
               now: float) -> TakeResult:
        return super().adjust(key, limits, [d * 2 if d < 0 else d for d in deltas], now)


class OverfillStore(MemoryStore):
    """Planted bug: charges half of each cost, so it admits twice the rate and capacity."""

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        return super().take(key, limits, [c / 2 for c in costs], now)


class SilentlyDownStore(MemoryStore):
    """Planted bug: an unreachable backend raises a bare OSError, not StoreUnavailableError."""

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        raise OSError("connection refused")


def test_racy_store_fails_concurrency() -> None:
    with pytest.raises(InvariantViolationError, match="no over-admission under concurrency"):
        limiter_store_contract(RacyStore)().test_concurrent_takes_never_over_admit()


def test_half_charging_store_fails_atomicity() -> None:
    with pytest.raises(InvariantViolationError, match="a denied check charges no limit"):
        limiter_store_contract(HalfChargingStore)().test_multi_limit_decisions_are_atomic()


def test_leaky_refund_store_fails_conservation() -> None:
    with pytest.raises(InvariantViolationError, match="reserve/settle conservation"):
        limiter_store_contract(LeakyRefundStore)().test_reserve_settle_conserves_tokens()


def test_overfilling_store_fails_the_greedy_bound() -> None:
    kit = limiter_store_contract(OverfillStore)()
    with pytest.raises(InvariantViolationError, match="capacity \\+ rate \\* T"):
        kit.test_greedy_client_bound()
    with pytest.raises(InvariantViolationError, match="admits its capacity, no more"):
        kit.test_full_bucket_admits_its_capacity()


def test_store_that_fails_wrongly_is_named() -> None:
    kit = limiter_store_contract(MemoryStore, break_store=lambda self, store: SilentlyDownStore())()
    with pytest.raises(InvariantViolationError, match="raises StoreUnavailableError") as info:
        kit.test_store_failure_follows_fail_open()
    assert "connection refused" in str(info.value)
