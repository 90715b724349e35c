"""Status codes: INVALID_ARGUMENT naming the field, UNAUTHENTICATED, NOT_FOUND,
RESOURCE_EXHAUSTED with retry information, UNAVAILABLE while starting, draining or full."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from servekit.client import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    RetryPolicy,
)
from servekit.client.grpc import GrpcClient
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc
from servekit.server.fake import FakeEngine
from servekit.server.keys import ApiKey

from .conftest import KEY, Served, serve

NO_RETRY = RetryPolicy(max_retries=0)


def _raw(address: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()
         ) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=5)
    return info.value


def _details(error: grpc.RpcError) -> tuple[status_pb2.Status, dict[str, str]]:
    trailing = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailing.pop("grpc-status-details-bin"))
    return status, trailing


BAD = [
    (dict(prompt="x"), "model"),
    (dict(model="fake"), "prompt"),
    (dict(model="fake", prompt=""), "prompt"),
    (dict(model="fake", prompt="x", max_tokens=0), "max_tokens"),
    (dict(model="fake", prompt="x", max_tokens=10**6), "max_tokens"),
    (dict(model="fake", prompt="x", temperature=-1), "temperature"),
    (dict(model="fake", prompt="x", top_p=2), "top_p"),
    (dict(model="fake", prompt="x", n=17), "n"),
    (dict(model="fake", prompt="x", logprobs=21), "logprobs"),
    (dict(model="fake", prompt="x", presence_penalty=3), "presence_penalty"),
    (dict(model="fake", prompt="x", stop=["s"] * 17), "stop"),
    (dict(model="fake", prompt_token_ids=pb.TokenIds(ids=[9999])), "prompt_token_ids"),
    (dict(model="fake", prompt_token_ids=pb.TokenIds()), "prompt_token_ids"),
    (dict(model="fake", chat=pb.Chat()), "chat.messages"),
    (dict(model="fake", chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])),
     "chat.messages[0].role"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
def test_invalid_argument_names_the_field(served: Served, fields: dict[str, Any],
                                          param: str) -> None:
    error = _raw(served.address, pb.GenerateRequest(**fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status, _ = _details(error)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert bad.field_violations[0].field == param
    assert param.split("[")[0].split(".")[0] in status.message


def test_client_raises_bad_request_with_param(served: Served) -> None:
    with GrpcClient(served.address) as client, pytest.raises(BadRequestError) as info:
        client.complete("fake", "x", top_p=0)
    assert info.value.param == "top_p" and info.value.status_code == 400
    with pytest.raises(TypeError, match="frobnicate"):
        client.complete("fake", "x", frobnicate=1)
    served.wait_idle()


def test_unknown_model_is_not_found(served: Served) -> None:
    error = _raw(served.address, pb.GenerateRequest(model="gpt-9", prompt="x"))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with GrpcClient(served.address) as client, pytest.raises(NotFoundError):
        client.complete("gpt-9", "x")


def test_keys_in_metadata(keyed: Served) -> None:
    request = pb.GenerateRequest(model="fake", prompt="x", max_tokens=2)
    for metadata in ((), (("authorization", "Bearer sk-wrong"),), (("authorization", KEY),)):
        error = _raw(keyed.address, request, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with GrpcClient(keyed.address) as anonymous, pytest.raises(AuthenticationError):
        anonymous.complete("fake", "x")
    with GrpcClient(keyed.address) as anonymous, anonymous.session() as session, \
            pytest.raises(AuthenticationError):
        session.complete("fake", "x").result()
    with GrpcClient(keyed.address, api_key=KEY) as client:
        assert client.complete("fake", "x", max_tokens=2).text == "th"
        with client.session() as session:
            assert session.complete("fake", "x", max_tokens=2).result().text == "th"
    keyed.wait_idle()


def test_rate_limited_with_retry_info(keyed: Served) -> None:
    request = pb.GenerateRequest(model="fake", prompt="x", max_tokens=2)
    metadata = (("authorization", "Bearer sk-limited"),)
    with grpc.insecure_channel(keyed.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        _, call = stub.Generate.with_call(request, metadata=metadata)
        initial = dict(call.initial_metadata())
        assert initial["x-ratelimit-limit-requests"] == "2"
        assert initial["x-ratelimit-remaining-requests"] == "1"
        stub.Generate(request, metadata=metadata)
    error = _raw(keyed.address, request, metadata)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    status, trailing = _details(error)
    assert int(trailing["retry-after"]) >= 1
    assert int(trailing["retry-after-ms"]) > 1000
    assert trailing["x-ratelimit-remaining-requests"] == "0"
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details) and retry.retry_delay.seconds >= 1
    with GrpcClient(keyed.address, api_key="sk-limited", retry=NO_RETRY) as client:
        with pytest.raises(RateLimitError) as info:
            client.complete("fake", "x", max_tokens=2)
        assert info.value.retry_after is not None and info.value.retry_after > 1
        assert info.value.limits["limit-requests"] == "2"
        with client.session() as session, pytest.raises(RateLimitError) as info:
            session.complete("fake", "x", max_tokens=2).result()
        assert info.value.limits["remaining-requests"] == "0"
    # another tenant's key is not limited by bob's
    with GrpcClient(keyed.address, api_key=KEY) as client:
        assert client.complete("fake", "x", max_tokens=2).text == "th"
    keyed.wait_idle()


def test_unavailable_while_starting_then_retry_honours_retry_after() -> None:
    with serve(ready=False) as served:
        with GrpcClient(served.address, retry=NO_RETRY) as client:
            with pytest.raises(OverloadedError) as info:
                client.complete("fake", "x", max_tokens=2)
            assert info.value.headers["retry-after-ms"] == "1000"
        timer = threading.Timer(0.3, served.service.state.set_ready)
        timer.start()
        start = time.monotonic()
        with GrpcClient(served.address, retry=RetryPolicy(max_retries=2)) as client:
            assert client.complete("fake", "x", max_tokens=2).text == "th"
        assert 0.95 < time.monotonic() - start < 3  # waited what retry-after-ms said
        timer.join()


def test_unavailable_while_draining_and_when_queue_full() -> None:
    engine = FakeEngine(token_delay=0.01, max_running=1, max_waiting=0)
    with serve(engine) as served, GrpcClient(served.address, retry=NO_RETRY) as client:
        stream = client.stream_complete("fake", "x", max_tokens=500)
        next(stream)
        with pytest.raises(OverloadedError, match="overloaded"):
            client.complete("fake", "x", max_tokens=2)
        stream.close()
        served.wait_idle()
        served.service.state.begin_drain()
        with pytest.raises(OverloadedError, match="draining"):
            client.complete("fake", "x", max_tokens=2)
        served.wait_idle()


def test_tenant_reaches_the_engine() -> None:
    seen: list[Any] = []

    class Recording(FakeEngine):
        def generate(self, prompt: Any, params: Any, **kw: Any) -> Any:
            seen.append((kw["tenant"], kw["cache_salt"]))
            return super().generate(prompt, params, **kw)

    keys = [ApiKey(KEY, tenant="alice", cache_salt="s1")]
    with serve(Recording(), keys=keys) as served, GrpcClient(served.address, api_key=KEY) as c:
        c.complete("fake", "x", max_tokens=1)
    assert seen == [("alice", "s1")]
