"""Stores as plugins: opened from a URL whose scheme names the plugin, one code path for all."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from servekit.limit import Limit, Limiter, LimitSet, MemoryStore, RedisStore, store_from_url
from servekit.limit.store import TakeResult
from servekit.plugins import PluginArgumentError, UnknownPluginError
from tests.limit.conftest import RedisServer


class CountingStore:
    """A third-party store: delegates to a MemoryStore and counts the calls it gets."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        self._count("take")
        return self.inner.take(key, limits, costs, now)

    def peek(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        self._count("peek")
        return self.inner.peek(key, limits, costs, now)

    def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float], now: float) -> TakeResult:
        self._count("adjust")
        return self.inner.adjust(key, limits, deltas, now)

    async def atake(self, key: str, limits: LimitSet, costs: Sequence[float],
                    now: float) -> TakeResult:
        self._count("atake")
        return self.inner.take(key, limits, costs, now)

    async def apeek(self, key: str, limits: LimitSet, costs: Sequence[float],
                    now: float) -> TakeResult:
        self._count("apeek")
        return self.inner.peek(key, limits, costs, now)

    async def aadjust(self, key: str, limits: LimitSet, deltas: Sequence[float],
                      now: float) -> TakeResult:
        self._count("aadjust")
        return self.inner.adjust(key, limits, deltas, now)


def test_memory_urls() -> None:
    assert isinstance(store_from_url("memory://"), MemoryStore)
    small = store_from_url("memory://?max_keys=2")
    limiter = Limiter([Limit("r", 1, 0.001)], store=small)
    assert limiter.try_acquire("a").allowed and limiter.try_acquire("b").allowed
    with pytest.raises(Exception, match="memory store is full"):
        limiter.try_acquire("c")
    assert isinstance(Limiter([Limit("r", 1, 1)], store="memory://").store, MemoryStore)


def test_bad_urls_name_the_plugin_and_the_cause() -> None:
    with pytest.raises(PluginArgumentError, match=r"'memory'.*memory://\?max_keys=lots.*integer"):
        store_from_url("memory://?max_keys=lots")
    with pytest.raises(PluginArgumentError, match=r"'memory'.*unknown parameter.*size"):
        store_from_url("memory://?size=3")
    with pytest.raises(UnknownPluginError, match=r"no limiter_store plugin named 'etcd'.*memory"):
        store_from_url("etcd://127.0.0.1:2379")
    with pytest.raises(PluginArgumentError, match="has no scheme"):
        store_from_url("127.0.0.1:6379")


def test_redis_url_opens_a_redis_store(redis_server: RedisServer) -> None:
    store = store_from_url(redis_server.url)
    assert isinstance(store, RedisStore)
    try:
        limiter = Limiter([Limit("r", 2, 0.001)], store=store)
        assert [limiter.try_acquire("url-key").allowed for _ in range(3)] == [True, True, False]
    finally:
        store.close()


def test_a_third_party_store_takes_the_same_path_as_the_built_in() -> None:
    store = CountingStore()
    limiter = Limiter([Limit("r", 3, 1000.0)], store=store, clock=anyio.current_time)
    served: list[int] = []

    async def client(i: int) -> None:
        decision = await limiter.acquire("k", reserve=True)
        served.append(i)
        await limiter.asettle(decision.reservation)  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(client, i)

    anyio.run(main)
    assert sorted(served) == list(range(20)) and limiter.num_waiters == 0
    assert store.calls["atake"] >= 20 and store.calls["aadjust"] == 20
    assert "take" not in store.calls  # the async path never calls the sync twins
