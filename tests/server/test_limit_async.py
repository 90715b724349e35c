"""Rate-limit decisions go through the store's async path: a slow Redis never stalls the loop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from servekit.limit import RedisStore
from servekit.server import ApiKey, FakeEngine, KeyStore, create_app
from servekit.server.ratelimit import KeyLimits
from tests.limit.conftest import RedisServer
from tests.server.conftest import serve

AUTH = {"authorization": "Bearer sk-a"}
BODY = {"model": "fake", "prompt": "hello", "max_tokens": 2}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)  # a test may leave it stopped
    server.stop()


def test_a_stalled_redis_holds_its_request_not_the_event_loop(redis: RedisServer) -> None:
    keys = KeyStore([ApiKey("sk-a", tenant="a", rpm=100_000, tpm=10_000_000)])
    limits = KeyLimits(store=RedisStore(redis.url, timeout=2.0))
    app = create_app(FakeEngine(max_model_len=256), keys=keys, limits=limits)
    with serve(app) as server:
        assert httpx.post(server.url + "/v1/completions", json=BODY, headers=AUTH).status_code \
            == 200
        os.kill(redis.proc.pid, signal.SIGSTOP)  # Redis stops answering: every call times out
        stalled: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: stalled.append(httpx.post(
            server.url + "/v1/completions", json=BODY, headers=AUTH, timeout=30)))
        thread.start()
        time.sleep(0.3)  # the request now waits on Redis
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert time.monotonic() - start < 1.0  # answered during the 2 s Redis wait
        thread.join(30)
        assert stalled[0].status_code == 503
        assert stalled[0].json()["error"]["code"] == "rate_limit_store_unavailable"
        os.kill(redis.proc.pid, signal.SIGCONT)
        ok = httpx.post(server.url + "/v1/completions", json=BODY, headers=AUTH)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "100000"
        assert server.metric("rate_limit_reservations") == 0


@pytest.mark.anyio
async def test_async_reserve_and_settle_count_like_the_sync_ones(redis: RedisServer) -> None:
    key = ApiKey("sk-a", tenant="a", rpm=3, tpm=1000)
    sync, async_ = (KeyLimits(store=RedisStore(redis.url, timeout=1.0)) for _ in range(2))
    headers = []
    for i in range(3):
        a = sync.reserve(key, f"m{i}", 100)
        b = await async_.areserve(key, f"n{i}", 100)
        headers.append((a.headers["x-ratelimit-remaining-tokens"],
                        b.headers["x-ratelimit-remaining-tokens"]))
        sync.settle(a, 40)
        await async_.asettle(b, 40)
    assert all(x == y == "900" for x, y in headers)
    assert sync.open_reservations == async_.open_reservations == 0
    again = await async_.areserve(key, "n0", 100)  # n0's bucket: 1 of 3 requests used
    assert again.headers["x-ratelimit-remaining-requests"] == "1"
    with anyio.CancelScope() as scope:  # a cancelled request still settles
        scope.cancel()
        await async_.asettle(again, 10)
    assert async_.open_reservations == 0
