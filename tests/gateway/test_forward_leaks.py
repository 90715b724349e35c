"""The forwarder's accounting, driven directly: every replica a request was routed to is
released exactly once, and every upstream response it opened is closed, however the request
ends — answered, retried, failed over, or cancelled (the client gone) at any await.

The upstream is scripted per attempt (what each ``send`` does); a ``hang_*`` step parks the
request at one await, and the test cancels it there, as Starlette cancels a relay whose
client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from servekit.gateway.budget import RetryBudget
from servekit.gateway.edge import Edge
from servekit.gateway.fleet import Fleet
from servekit.gateway.forward import Forwarder
from servekit.gateway.metrics import GatewayMetrics
from servekit.gateway.upstream import Upstream
from servekit.limit import ApiKey, KeyLimits, KeyStore
from servekit.protocol.replica import EXTENSIONS_HEADER, TOKEN_IDS
from servekit.server.replica_api import token_ids_comment

REPLICAS = ["http://r0", "http://r1", "http://r2"]
#: What one attempt's upstream does. ``cut``: a stream that sends one token, then resets.
STEPS = ["ok", "connect_error", "503", "429", "cut", "reset_first",
         "hang_head", "hang_retry_body", "hang_first", "hang_mid"]


def _event(i: int) -> bytes:
    doc = {"id": "cmpl-1", "created": 1, "object": "text_completion",
           "choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
    return token_ids_comment(0, [i]) + b"data: " + json.dumps(doc).encode() + b"\n\n"


class _Response:
    """One scripted upstream response (the shape of an UpstreamResponse)."""

    def __init__(self, script: _Script, step: str, status: int, stream: bool) -> None:
        self.script, self.step, self.status_code = script, step, status
        self.stream = stream
        self.headers = httpx.Headers({EXTENSIONS_HEADER: TOKEN_IDS} if status == 200 else {})
        self.closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        step = self.step
        if step in ("hang_retry_body", "hang_first"):
            await self.script.hang()
        if step == "reset_first":
            raise httpx.ReadError("reset before the first byte")
        if self.status_code != 200:
            yield b'{"error": {"message": "busy"}}'
            return
        if not self.stream:
            yield b'{"usage": {"total_tokens": 3}}'
            return
        yield _event(1)
        if step == "hang_mid":
            await self.script.hang()
        if step == "cut":
            raise httpx.ReadError("the replica died mid-stream")
        yield _event(2) + b"data: [DONE]\n\n"

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_raw()])

    async def aclose(self) -> None:
        self.closed = True


class _Script:
    """An upstream whose attempts follow ``steps`` (then ``ok``)."""

    def __init__(self, steps: list[str], stream: bool) -> None:
        self.steps, self.stream = list(steps), stream
        self.responses: list[_Response] = []
        self.parked = asyncio.Event()
        self.parks = 0
        #: Set: the requests parked go on (else they wait until cancelled).
        self.gate = asyncio.Event()

    async def hang(self) -> None:
        self.parks += 1
        self.parked.set()
        await self.gate.wait()

    async def send(self, method: str, url: str, headers: Any, body: bytes = b"") -> _Response:
        step = self.steps.pop(0) if self.steps else "ok"
        if step == "connect_error":
            raise httpx.ConnectError("refused")
        if step == "hang_head":
            await self.hang()
        status = {"503": 503, "429": 429, "hang_retry_body": 503}.get(step, 200)
        response = _Response(self, step, status, self.stream)
        self.responses.append(response)
        return response


async def _run(steps: list[str], stream: bool) -> tuple[Fleet, _Script, bool]:
    fleet = Fleet(REPLICAS, secret="s", failure_threshold=100)
    script = _Script(steps, stream)
    forwarder = Forwarder(fleet, cast(Upstream, script),
                          RetryBudget(ratio=1.0, min_retries=1000), GatewayMetrics())
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": stream})

    async def client() -> None:
        response = await forwarder.forward("POST", "/v1/completions", {}, body.encode())
        if isinstance(response, StreamingResponse):
            async for _ in response.body_iterator:
                pass

    task = asyncio.ensure_future(client())
    parked = asyncio.ensure_future(script.parked.wait())
    await asyncio.wait({task, parked}, return_when=asyncio.FIRST_COMPLETED)
    cancelled = not task.done()
    if cancelled:  # the client went away where the script parked the request
        task.cancel()
    parked.cancel()
    try:
        await task
    except asyncio.CancelledError:
        assert cancelled
    return fleet, script, cancelled


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.sampled_from(STEPS), max_size=6), stream=st.booleans())
@example(steps=["hang_head"], stream=False)  # cancelled awaiting the first replica's head
@example(steps=["hang_retry_body"], stream=False)  # ... reading a 503 before the retry
@example(steps=["cut", "hang_head"], stream=True)  # ... awaiting the resuming replica's head
@example(steps=["cut", "hang_retry_body"], stream=True)  # ... reading its refusal
def test_every_routed_request_is_released_once_and_every_response_closed(
        steps: list[str], stream: bool) -> None:
    fleet, script, _ = asyncio.run(_run(steps, stream))
    assert fleet.router.loads == dict.fromkeys(REPLICAS, 0)
    assert all(r.closed for r in script.responses), [r.step for r in script.responses]


async def _serve_one(spec: str) -> None:
    """One stream through the edge and the forwarder, sent as Starlette sends it to a client
    that goes away: under ASGI 2.4 its ``send`` raises at the response start (Starlette never
    starts the body); under 2.3 the first body part blocks (the client stopped reading) and
    the disconnect cancels the send, the relay suspended at its yield. Checked as the response
    ends, with the response (and its body) still referenced: not when the garbage collector,
    or the event loop's shutdown, closes the body."""
    fleet = Fleet(REPLICAS, secret="s", failure_threshold=100)
    script = _Script([], stream=True)
    limits = KeyLimits()
    edge = Edge(KeyStore([ApiKey("sk-t", tpm=1000)]), limits, fleet)
    forwarder = Forwarder(fleet, cast(Upstream, script),
                          RetryBudget(ratio=1.0, min_retries=1000), GatewayMetrics(), edge=edge)
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True})
    response = await forwarder.forward("POST", "/v1/completions",
                                       {"authorization": "Bearer sk-t"}, body.encode())
    assert limits.open_reservations == 1
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if spec == "2.4":
            raise OSError("the client went away")
        if message["type"] == "http.response.body":
            gone.set()
            await asyncio.Event().wait()  # blocked until cancelled

    scope = {"type": "http", "asgi": {"spec_version": spec}}
    with contextlib.suppress(ClientDisconnect):
        await response(scope, receive, send)
    assert fleet.router.loads == dict.fromkeys(REPLICAS, 0)
    assert [r.closed for r in script.responses] == [True]  # the replica sees the abort
    assert limits.open_reservations == 0


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_a_stream_whose_client_went_away_is_released_when_its_response_ends(spec: str) -> None:
    asyncio.run(_serve_one(spec))


def test_a_release_after_the_replica_left_and_came_back_is_not_counted_on_its_return() -> None:
    """A replica that leaves the fleet (a replicas-file edit, or a file read mid-write) while a
    stream is in flight there and comes back before it ends: its return starts a new count,
    which the old stream's end must not take from (it raised out of the relay, the router
    finding no request in flight, or took another request's count)."""

    async def main() -> None:
        fleet = Fleet(["http://static"], secret="s", failure_threshold=100)
        fleet.set_replicas(["http://r"])
        fleet.router.health.mark_down("http://static")  # every request goes to r
        script = _Script(["hang_mid", "hang_mid"], stream=True)
        forwarder = Forwarder(fleet, cast(Upstream, script),
                              RetryBudget(ratio=1.0, min_retries=1000), GatewayMetrics())
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True})

        async def client() -> None:
            response = await forwarder.forward("POST", "/v1/completions", {}, body.encode())
            assert isinstance(response, StreamingResponse)
            async for _ in response.body_iterator:
                pass

        old = asyncio.ensure_future(client())
        await script.parked.wait()  # the old stream is in flight on r
        fleet.set_replicas([])
        fleet.set_replicas(["http://r"])  # r is back: nothing in flight on it
        new = asyncio.ensure_future(client())  # one stream on r's return
        while script.parks < 2:
            await asyncio.sleep(0)
        assert fleet.router.loads["http://r"] == 1
        old.cancel()  # the old stream ends (its client went away)
        with contextlib.suppress(asyncio.CancelledError):
            await old
        assert fleet.router.loads["http://r"] == 1  # the new stream is still counted
        script.gate.set()
        await new
        assert fleet.router.loads["http://r"] == 0

    asyncio.run(main())


def test_a_stream_read_to_its_end_is_cleaned_up_before_its_last_message_goes_out() -> None:
    # the client sees the end only after the reservation is settled: a request it sends next
    # must not be refused for a reservation its finished stream still holds
    from servekit.gateway.forward import _RelayResponse

    events: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    async def cleanup() -> None:
        events.append("cleaned up")

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            events.append("last message")

    async def receive() -> Any:
        await asyncio.Event().wait()  # the client stays

    response = _RelayResponse(body(), 200, {})
    response.on_close.append(cleanup)
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert events == ["cleaned up", "last message"]  # and once: not again as the response ends
