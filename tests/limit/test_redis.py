"""Redis-only behaviour: one round trip, key layout, script reload, sharing, outages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from servekit.limit import Limit, Limiter, RedisStore, StoreUnavailableError

from .conftest import RedisServer

RPD = Limit.per_day("requests", 5)
TPD = Limit.per_day("tokens", 1000)


def test_one_round_trip_per_decision(redis_store: RedisStore) -> None:
    limiter = Limiter([Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 10_000)],
                      store=redis_store)
    limiter.try_acquire("warm")  # loads the script
    redis_store.client.config_resetstat()
    for i in range(20):
        assert limiter.try_acquire(f"k{i % 3}", {"rpm": 1, "tpm": 250}).allowed
    stats = redis_store.client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    for own in ("config|resetstat", "info"):  # the test's own commands, if counted
        calls.pop(own, None)
    assert calls.pop("evalsha") == 20  # the only command sent per decision
    assert calls.pop("time") == 20  # the server's clock, read in the script
    assert set(calls) <= {"hmget", "hset", "pexpire"}  # all called inside the script


class _Proxy:
    """A client that is not a ``redis.Redis``: the store must use its generic path."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_generic_client_path(redis_store: RedisStore) -> None:
    store = RedisStore(client=_Proxy(redis_store.client))
    limiter = Limiter([Limit("rps", 3, 0.001), Limit("tps", 100, 0.1)], store=store)
    assert [limiter.try_acquire("g", {"rps": 1, "tps": 40}).allowed for _ in range(3)] == [
        True, True, False]
    redis_store.client.script_flush()
    assert limiter.try_acquire("g", {"rps": 1, "tps": 10}).allowed
    fast = Limiter(limiter.limits.limits, store=redis_store)  # same state, other path
    status = fast.peek("g").status("tps")
    assert status.remaining == pytest.approx(10, abs=1e-3)


class _TrickleSocket:
    """Hands out a reply a few bytes per ``recv``."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step = data, step

    def recv(self, size: int) -> bytes:
        out, self.data = self.data[: self.step], self.data[self.step :]
        return out


@pytest.mark.parametrize("step", [1, 3, 64])
def test_reply_parser_handles_partial_reads(step: int) -> None:
    from servekit.limit.redis import _read_reply

    assert _read_reply(_TrickleSocket(b"*3\r\n:1\r\n:-20\r\n:300\r\n", step)) == [1, -20, 300]
    assert _read_reply(_TrickleSocket(b"$3\r\nabc\r\n", step)) == b"abc"
    err = _read_reply(_TrickleSocket(b"-NOSCRIPT no script\r\n", step))
    assert str(err).startswith("NOSCRIPT")
    with pytest.raises(ConnectionError):
        _read_reply(_TrickleSocket(b"*2\r\n:1\r\n", step))  # closed mid-reply


def test_key_layout_prefix_hash_tag_and_expiry(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, prefix="acme:rl:")
    limiter = Limiter([Limit.per_second("rps", 10), Limit.per_minute("rpm", 100)], store=store)
    limiter.try_acquire("user:7", 4)
    assert store.client.exists("acme:rl:{user:7}") == 1
    ttl_ms = store.client.pttl("acme:rl:{user:7}")
    assert 0 < ttl_ms <= 2402  # the key lives exactly until both buckets are full again
    assert set(store.client.hgetall("acme:rl:{user:7}")) == {b"rps", b"rpm"}
    d = limiter.try_acquire("user:7", 0, reserve=True)
    assert d.reservation is not None
    limiter.settle(d.reservation, 0)
    store.close()


def test_script_is_reloaded_after_flush(redis_store: RedisStore) -> None:
    limiter = Limiter([RPD], store=redis_store)
    assert limiter.try_acquire("k").allowed
    redis_store.client.script_flush()
    assert limiter.try_acquire("k").allowed
    assert limiter.peek("k").status("requests").remaining == pytest.approx(3, abs=1e-3)


_WORKER = textwrap.dedent(
    """
    import sys, time
    from servekit.limit import Limit, Limiter, RedisStore
    url, start = sys.argv[1], float(sys.argv[2])
    limiter = Limiter([Limit("requests", 10, 50.0)], store=RedisStore(url, timeout=2.0))
    while time.time() < start:
        time.sleep(0.001)
    admitted = 0
    first = time.time()
    while time.time() < start + 0.6:
        admitted += limiter.try_acquire("shared").allowed
    print(admitted, first, time.time())
    """
)


@pytest.mark.slow
def test_two_processes_share_one_limit(redis_store: RedisStore, redis_server: RedisServer) -> None:
    start = time.time() + 3.0  # room for both interpreters to import on a loaded machine
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, redis_server.url, str(start)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    counts = [int(r[0]) for r in results]
    span = max(float(r[2]) for r in results) - min(float(r[1]) for r in results)
    assert all(c > 0 for c in counts)  # both got a share
    # One shared bucket: at most capacity 10 + 50/s over the span both workers ran (two
    # separate buckets would admit about twice that), and at least the burst.
    assert 10 <= sum(counts) <= 10 + 50 * span + 2


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_stopped_mid_test(own_redis: RedisServer, fail_open: bool) -> None:
    store = RedisStore(own_redis.url, timeout=0.2)
    limiter = Limiter([RPD], store=store, fail_open=fail_open, error_retry_after=2.5)
    assert limiter.try_acquire("k").allowed and limiter.try_acquire("k").error is None
    own_redis.stop()
    d = limiter.try_acquire("k")
    assert d.allowed is fail_open and d.conforming is fail_open
    assert d.error is not None and "store unavailable" in d.error
    assert ("fail-open" if fail_open else "fail-closed") in d.error
    assert d.retry_after == (0.0 if fail_open else 2.5)
    with pytest.raises(StoreUnavailableError):
        store.take("k", limiter.limits, (1.0,), 0.0)
    store.close()


@pytest.mark.parametrize("cancel_at", ["in flight", "as the reply lands"])
def test_a_natively_cancelled_acquire_charges_nothing(redis_store: RedisStore,
                                                       cancel_at: str) -> None:
    # asyncio's own task.cancel() (grpc.aio's on a cancelled RPC, asyncio.timeout) is not
    # anyio's cancellation: it goes through the store's shield while the command runs on in
    # its worker thread, so the caller never learns of a charge Redis made
    import asyncio
    import threading

    limiter = Limiter([RPD, TPD], store=redis_store)
    cost = {"requests": 1, "tokens": 600}

    def remaining() -> list[int]:
        return [round(s.remaining) for s in limiter.peek("c").statuses]

    full = remaining()
    tasks: list[asyncio.Task[None]] = []
    store_trip = redis_store._trip
    returned = threading.Event()

    def reply_then_cancel(*args: Any) -> Any:  # cancelled after the reply, before it is read
        result = store_trip(*args)
        tasks[0].get_loop().call_soon_threadsafe(tasks[0].cancel)
        returned.set()
        return result

    async def acquire() -> None:
        await limiter.atry_acquire("c", cost, reserve=True)
        pytest.fail("the cancelled acquire returned")

    async def scenario() -> None:
        tasks.append(asyncio.create_task(acquire()))
        if cancel_at == "in flight":
            await asyncio.sleep(0.2)  # the EVALSHA waits behind CLIENT PAUSE
            tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await asyncio.sleep(0.8)  # the paused command runs, and what it charged comes back

    if cancel_at == "in flight":
        redis_store.client.execute_command("CLIENT", "PAUSE", 400, "ALL")
    else:
        redis_store._trip = reply_then_cancel  # type: ignore[method-assign]
    asyncio.run(scenario())
    assert cancel_at == "in flight" or returned.is_set()
    assert remaining() == full == [5, 1000]
    assert limiter.try_acquire("c", cost).allowed  # a charge that stood would deny it
