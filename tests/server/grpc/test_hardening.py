"""gRPC under hostile input, overload, a limiter-store outage and a drain: the right status codes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from servekit.limit import RedisStore
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc
from servekit.server.fake import FakeEngine
from servekit.server.keys import ApiKey
from servekit.server.ratelimit import KeyLimits
from tests.limit.conftest import RedisServer

from .conftest import Served, serve

GENERATE = "/servekit.v1.Generation/Generate"


def _call(served: Served, request: pb.GenerateRequest,
          metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError | Any:
    with grpc.insecure_channel(served.address) as channel:
        try:
            return pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata,
                                                            timeout=10)
        except grpc.RpcError as exc:
            return exc


def test_bad_utf8_on_the_wire_is_invalid_argument(served: Served) -> None:
    """A lone surrogate can only reach gRPC as bytes that are not UTF-8: INVALID_ARGUMENT."""
    good = pb.GenerateRequest(model="fake", prompt="ROMEO x").SerializeToString()
    bad = good.replace(b"ROMEO x", b"ROM\xed\xa0\x80x")  # CESU-8 for U+D800, same length
    with grpc.insecure_channel(served.address) as channel:
        raw = channel.unary_unary(GENERATE, request_serializer=None,
                                  response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            raw(bad, timeout=10)
        stream = channel.unary_stream("/servekit.v1.Generation/GenerateStream",
                                      request_serializer=None,
                                      response_deserializer=pb.GenerateChunk.FromString)
        with pytest.raises(grpc.RpcError) as stream_info:
            list(stream(bad, timeout=10))
        assert raw(good, timeout=10).choices  # the server is fine afterwards
    for error in (info.value, stream_info.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "UTF-8" in (error.details() or "")


def test_underflowing_top_p_is_invalid_argument_naming_it(served: Served) -> None:
    error = _call(served, pb.GenerateRequest(model="fake", prompt="x", top_p=1e-46))
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in error.details()
    ok = _call(served, pb.GenerateRequest(model="fake", prompt="x", temperature=1e-39))
    assert not isinstance(ok, grpc.RpcError) and ok.choices


def test_a_never_admissible_request_is_invalid_argument_not_unavailable() -> None:
    with serve(FakeEngine(max_running=2, max_waiting=3)) as served:
        error = _call(served, pb.GenerateRequest(model="fake", prompt="x", n=6))
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 5" in error.details()
        ok = _call(served, pb.GenerateRequest(model="fake", prompt="x", n=5, max_tokens=2))
        assert len(ok.choices) == 5
        served.wait_idle()


def test_a_limiter_store_outage_is_unavailable_with_its_own_reason() -> None:
    redis = RedisServer()
    try:
        limits = KeyLimits(store=RedisStore(redis.url, timeout=0.5), outage_retry_after=12)
        with serve(keys=[ApiKey("sk-a", tenant="a", rpm=1000)], limits=limits) as served:
            auth = (("authorization", "Bearer sk-a"),)
            assert _call(served, pb.GenerateRequest(model="fake", prompt="x"), auth).choices
            redis.stop()
            error = _call(served, pb.GenerateRequest(model="fake", prompt="x"), auth)
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "limit store is unavailable" in error.details()
            trailing = dict(error.trailing_metadata())
            assert trailing.get("retry-after") == "12"
            assert limits.store_errors == 1
            served.wait_idle()
    finally:
        redis.stop()


def test_an_rpc_cancelled_during_admission_leaves_its_rate_limit_uncharged() -> None:
    # grpc.aio cancels the handler's task with asyncio's own task.cancel() when the client's
    # deadline passes: the Redis round trip it was waiting on must not leave a charge behind
    import redis as redis_py

    redis = RedisServer()
    try:
        limits = KeyLimits(store=RedisStore(redis.url, timeout=2.0))
        with serve(keys=[ApiKey("sk-a", tenant="a", rpm=2)], limits=limits) as served:
            auth = (("authorization", "Bearer sk-a"),)
            request = pb.GenerateRequest(model="fake", prompt="x", max_tokens=2)
            with redis_py.Redis.from_url(redis.url) as pauser:  # holds the take's EVALSHA
                pauser.execute_command("CLIENT", "PAUSE", 600, "ALL")
            with (grpc.insecure_channel(served.address) as channel,
                  pytest.raises(grpc.RpcError) as info):
                pb_grpc.GenerationStub(channel).Generate(request, metadata=auth, timeout=0.2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.0)  # the paused take runs; the cancelled call's charge comes back
            codes = [r.code() if isinstance(r, grpc.RpcError) else grpc.StatusCode.OK
                     for r in (_call(served, request, auth) for _ in range(3))]
            # the key's two requests a minute, both still there
            assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK,
                             grpc.StatusCode.RESOURCE_EXHAUSTED]
            served.wait_idle()
    finally:
        redis.stop()


def test_a_drain_past_the_grace_period_ends_streams_with_unavailable() -> None:
    engine = FakeEngine(token_delay=0.02)
    with serve(engine) as served:
        async def stream() -> tuple[int, grpc.StatusCode | None]:
            chunks = 0
            async with grpc.aio.insecure_channel(served.address) as channel:
                call = pb_grpc.GenerationStub(channel).GenerateStream(
                    pb.GenerateRequest(model="fake", prompt="x", max_tokens=500))
                try:
                    async for _ in call:
                        chunks += 1
                        if chunks == 3:
                            asyncio.get_running_loop().create_task(
                                served.service.state.drain(0.2))
                except grpc.aio.AioRpcError as exc:
                    return chunks, exc.code()
            return chunks, None

        chunks, code = served.run(stream())
        assert code == grpc.StatusCode.UNAVAILABLE and 3 <= chunks < 100
        refused = _call(served, pb.GenerateRequest(model="fake", prompt="x"))
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        served.wait_idle()


def test_sigterm_with_grpc_beside_ends_grpc_streams_with_unavailable() -> None:
    import signal
    import threading

    from tests.server.conftest import free_port
    from tests.server.test_lifecycle import _cli

    port = free_port()
    proc, _ = _cli("--fake-token-delay", "0.05", "--grace-period", "1", "--grpc-port", str(port))
    codes: list[Any] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GenerationStub(channel).GenerateStream(
                pb.GenerateRequest(model="fake", prompt="x", max_tokens=400), timeout=30)
            chunks = 0
            try:
                for _ in call:
                    chunks += 1
                    if chunks == 2:
                        threading.Timer(0.1, proc.send_signal, (signal.SIGTERM,)).start()
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode() if proc.stdout else ""
    finally:
        proc.kill()
    assert codes == [grpc.StatusCode.UNAVAILABLE] and 2 <= chunks < 100
    assert "Traceback" not in log, log
