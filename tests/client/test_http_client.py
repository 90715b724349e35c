"""The SDK against a real HTTP server on 127.0.0.1 that plays scripted answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from servekit.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    RetryPolicy,
    Timeout,
)
from tests.asgi_server import free_port, serve_asgi


class Script:
    """Answers to play in order; the last one repeats. Records when each request came in."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], Any]] = []
        self.seen: list[tuple[float, dict[str, Any], dict[str, str]]] = []

    def next(self) -> tuple[int, dict[str, str], Any]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _error(message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "hello", "finish_reason": "length", "logprobs": None}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
CHAT = {"id": "chat-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}


def _sse(chunks: list[dict[str, Any]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def make_app(script: Script) -> Starlette:
    async def handle(request: Request) -> Response:
        body = await request.json() if request.method == "POST" else {}
        script.seen.append((time.monotonic(), body, dict(request.headers)))
        status, headers, payload = script.next()
        if payload == "sleep":
            await anyio.sleep(5)
        if status == 200 and body.get("stream"):
            return StreamingResponse(_sse(payload), media_type="text/event-stream")
        return JSONResponse(payload, status_code=status, headers=headers)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    return Starlette(routes=[Route("/v1/completions", handle, methods=["POST"]),
                             Route("/v1/chat/completions", handle, methods=["POST"]),
                             Route("/v1/models", models)])


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    # a "sleep" answer outlives its (timed-out) client: do not wait 5 s for it at shutdown
    with serve_asgi(make_app(script), timeout_graceful_shutdown=0.2) as url:
        yield url, script


@pytest.fixture
def script(server: tuple[str, Script]) -> Script:
    s = server[1]
    s.answers.clear()
    s.seen.clear()
    return s


@pytest.fixture
def url(server: tuple[str, Script]) -> str:
    return server[0]


def test_complete_chat_and_models_parse_typed_responses(url: str, script: Script) -> None:
    script.answers[:] = [(200, {}, COMPLETION)]
    with Client(url, api_key="sk-test") as client:
        out = client.complete("m", "Hi", max_tokens=2, temperature=None)
        assert out.text == "hello" and out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.total_tokens == 5
        _, body, headers = script.seen[-1]
        assert body == {"model": "m", "prompt": "Hi", "max_tokens": 2}  # None fields left out
        assert headers["authorization"] == "Bearer sk-test"
        script.answers[:] = [(200, {}, CHAT)]
        chat = client.chat("m", [{"role": "user", "content": "hey"}])
        assert chat.text == "hi there" and chat.choices[0].message.role == "assistant"
        assert client.models() == ["m"]


def test_stream_yields_chunks_then_usage(url: str, script: Script) -> None:
    chunks = [
        {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "text": "a", "finish_reason": None}]},
        {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "text": "b", "finish_reason": "length"}]},
        {"id": "c", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    ]
    script.answers[:] = [(200, {}, chunks)]
    with Client(url) as client:
        got = list(client.stream_complete("m", "x", max_tokens=2))
    assert "".join(c.text for c in got) == "ab"
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == 2
    assert script.seen[-1][1]["stream_options"] == {"include_usage": True}


def test_retry_after_429_waits_what_the_server_says(url: str, script: Script) -> None:
    script.answers[:] = [
        (429, {"retry-after-ms": "400", "retry-after": "1"}, _error("slow down", "rate_limit_exceeded")),
        (200, {}, COMPLETION),
    ]
    with Client(url, retry=RetryPolicy(max_retries=2)) as client:
        out = client.complete("m", "x")
    assert out.text == "hello"
    assert len(script.seen) == 2
    waited = script.seen[1][0] - script.seen[0][0]
    assert 0.4 <= waited < 0.9  # retry-after-ms wins over retry-after


def test_rate_limit_error_carries_headers_when_retries_run_out(url: str, script: Script) -> None:
    headers = {"retry-after": "0", "x-ratelimit-limit-requests": "10",
               "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6s"}
    script.answers[:] = [(429, headers, _error("limited", "rate_limit_exceeded"))]
    with Client(url, retry=RetryPolicy(max_retries=1)) as client, pytest.raises(RateLimitError) as info:
        client.complete("m", "x")
    assert len(script.seen) == 2
    assert info.value.retry_after == 0
    assert info.value.limits == {"limit-requests": "10", "remaining-requests": "0", "reset-requests": "6s"}


def test_503_is_retried_with_backoff_then_succeeds(url: str, script: Script) -> None:
    script.answers[:] = [(503, {}, _error("busy", "overloaded")), (200, {}, COMPLETION)]
    with Client(url, retry=RetryPolicy(max_retries=3, base_delay=0.01)) as client:
        assert client.complete("m", "x").text == "hello"
    assert len(script.seen) == 2


@pytest.mark.parametrize(
    ("status", "error", "retried"),
    [(400, BadRequestError, False), (401, AuthenticationError, False), (404, NotFoundError, False),
     (500, InternalServerError, False), (503, OverloadedError, True)],
)
def test_each_status_maps_to_its_exception(url: str, script: Script, status: int,
                                           error: type[Exception], retried: bool) -> None:
    script.answers[:] = [(status, {}, _error("bad max_tokens", "invalid_request_error", "max_tokens"))]
    with Client(url, retry=RetryPolicy(max_retries=1, base_delay=0.0)) as client, pytest.raises(error) as info:
        client.complete("m", "x")
    assert len(script.seen) == (2 if retried else 1)
    if status == 400:
        assert isinstance(info.value, BadRequestError) and info.value.param == "max_tokens"


def test_connection_refused_and_timeouts() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Client(dead, retry=RetryPolicy(max_retries=1, base_delay=0.0)) as client, pytest.raises(APIConnectionError):
        client.complete("m", "x")


def test_read_timeout_raises_timeout_error(url: str, script: Script) -> None:
    script.answers[:] = [(200, {}, "sleep")]
    with Client(url, timeout=Timeout(read=0.2), retry=RetryPolicy(max_retries=0)) as client:
        start = time.monotonic()
        with pytest.raises(APITimeoutError):
            client.complete("m", "x")
    assert time.monotonic() - start < 2


def test_total_timeout_stops_retrying(url: str, script: Script) -> None:
    script.answers[:] = [(429, {"retry-after": "5"}, _error("limited", "rate_limit_exceeded"))]
    with Client(url, timeout=Timeout(total=1.0), retry=RetryPolicy(max_retries=5)) as client:
        start = time.monotonic()
        with pytest.raises(RateLimitError):
            client.complete("m", "x")
    assert time.monotonic() - start < 1.0 and len(script.seen) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_complete_stream_and_retry(url: str, script: Script, backend: str) -> None:
    chunks = [{"id": "c", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}]}]

    async def main() -> None:
        async with AsyncClient(url, retry=RetryPolicy(max_retries=2, base_delay=0.0)) as client:
            script.answers[:] = [(429, {"retry-after-ms": "50"}, _error("x", "rate_limit_exceeded")),
                                 (200, {}, COMPLETION)]
            assert (await client.complete("m", "x")).text == "hello"
            script.answers[:] = [(200, {}, chunks)]
            got = [c async for c in client.stream_chat("m", [{"role": "user", "content": "hi"}])]
            assert [c.text for c in got] == ["yo"]
            assert await client.models() == ["m"]
            script.answers[:] = [(401, {}, _error("no key", "authentication_error"))]
            with pytest.raises(AuthenticationError):
                await client.complete("m", "x")

    anyio.run(main, backend=backend)
