"""One request through the gateway: route, send, retry before the first byte, relay.

Before anything reaches the client, a connect error, a reset, a 503 or a replica's 429 sends
the request to a replica not yet tried (the router's next choice), while the
:class:`~servekit.gateway.budget.RetryBudget` allows. A stream is committed once its first
chunk has arrived. After that, a stream a servekit replica relays with its token ids
(:mod:`servekit.gateway.failover`) that breaks before ``[DONE]`` (reset, EOF, replica killed),
or that a draining replica ends with its ``draining`` error, is resumed on another replica, up
to ``max_failovers`` times, and the client sees one stream; when none can resume it, the
stream ends with an error event. Any other stream that breaks
ends early, as the replica left it. A client that goes away closes the upstream connection,
which aborts the request on the replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
from attrs import define, field
from starlette.responses import JSONResponse, Response, StreamingResponse

from servekit.gateway.budget import RetryBudget
from servekit.gateway.edge import Edge, cached_total, usage_total
from servekit.gateway.failover import StreamTracker, resumable, resume_body
from servekit.gateway.fleet import Fleet
from servekit.gateway.metrics import GatewayMetrics
from servekit.gateway.tracing import GatewayTracer, RequestTrace, TracedResponse
from servekit.gateway.upstream import Upstream, UpstreamResponse
from servekit.gateway.usage import Ledger, LedgerResponse
from servekit.protocol.errors import InvalidRequestError, StatusError
from servekit.protocol.replica import (
    ATTEMPT_HEADER,
    CACHE_SALT_HEADER,
    EXTENSIONS_HEADER,
    GATEWAY_SECRET_HEADER,
    PRIVATE_HEADER_PREFIX,
    TENANT_HEADER,
    TOKEN_IDS,
    USAGE,
)
from servekit.protocol.sse import DONE, error_event
from servekit.route import NoNodeAvailableError
from servekit.usage.recorder import UsageRecorder

RETRYABLE_STATUS = frozenset({429, 503})
_HOP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive",
                          "transfer-encoding", "te", "upgrade", "proxy-authorization"})
_ALL_DOWN_RETRY_AFTER = 1
_DONE = b"data: [DONE]"


def unavailable(message: str, retry_after: int = _ALL_DOWN_RETRY_AFTER) -> JSONResponse:
    """The 503 the gateway answers when no replica can take the request."""
    return JSONResponse({"error": {"message": message, "type": "service_unavailable",
                                   "param": None, "code": "no_replica_available"}},
                        status_code=503, headers={"retry-after": str(retry_after)})


@define(slots=True)
class _Call:
    """One client request on its way through the fleet."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    parsed: dict[str, Any] | None
    stream: bool
    session: str | None
    ids: list[int] | None
    hashes: list[int] | None
    resumable: bool
    tried: set[str] = field(factory=set)
    #: Tokens the replicas reported used (prompt + completion), once known.
    used: int | None = None
    #: The client request's ledger record (when the gateway records usage).
    ledger: Ledger | None = None
    #: Its OpenTelemetry spans (when the gateway traces).
    trace: RequestTrace | None = None
    #: Prompt tokens the index predicted cached on the replica of the latest attempt.
    predicted: int | None = None
    #: The attempt (replica, response) a committed stream hands its relay, until the relay
    #: has released it (if the relay never starts, the response's end releases it).
    handed: tuple[str, UpstreamResponse] | None = None
    #: The incarnation (:attr:`Fleet.joined`) of the replica of the latest attempt.
    joined: int | None = None


class _RelayResponse(StreamingResponse):
    """A relayed stream that is over when its response is: its body is closed and then
    ``on_close`` runs (shielded), once. A body read to its end does this before the response's
    last message, so the client sees the end only after the cleanup (a request the client
    sends next finds the reservation settled). Otherwise it happens when the response ends:
    Starlette leaves a body it stopped reading (the client gone) to the garbage collector, and
    never starts one whose response start failed (an ASGI 2.4 server's ``send`` raises once
    the client is gone); the relay's cleanup (the upstream connection, whose close aborts the
    request on the replica; the replica's in-flight count; the edge's reservation) waits for
    neither."""

    def __init__(self, body: AsyncIterator[bytes], status_code: int,
                 headers: Mapping[str, str]) -> None:
        super().__init__(self._then_close(body), status_code=status_code, headers=headers)
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self._relay: AsyncIterator[bytes] | None = body

    async def _then_close(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            yield chunk
        await self._close()

    async def _close(self) -> None:
        relay, self._relay = self._relay, None
        if relay is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                aclose = getattr(relay, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                for close in self.on_close:
                    await close()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


class Forwarder:
    """Sends requests to the fleet's replicas over one pooled keep-alive client."""

    def __init__(self, fleet: Fleet, client: Upstream, budget: RetryBudget,
                 metrics: GatewayMetrics, max_failovers: int = 3,
                 edge: Edge | None = None, usage: UsageRecorder | None = None,
                 tracer: GatewayTracer | None = None) -> None:
        self.fleet, self.client, self.budget, self.metrics = fleet, client, budget, metrics
        self.tracer = tracer
        self.max_failovers = max_failovers
        self.edge = edge
        self.usage = usage

    async def forward(self, method: str, path: str, headers: Mapping[str, str],
                      body: bytes) -> Response:
        """Forward one request; the response the client gets."""
        if self.tracer is None:
            return await self._forward(method, path, headers, body, None)
        trace = self.tracer.request(method, path, headers)
        try:
            response = await self._forward(method, path, headers, body, trace)
        except BaseException as exc:
            trace.end(None, exc)
            raise
        return TracedResponse(response, trace)

    async def _forward(self, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, trace: RequestTrace | None) -> Response:
        fleet, edge = self.fleet, self.edge
        parsed = _json(body)
        if parsed is not None and "servekit_resume" in parsed:
            return _status(InvalidRequestError("servekit_resume is set only by the gateway",
                                               param="servekit_resume"))
        key = None
        if edge is not None:
            try:
                key = edge.authenticate(headers)
            except StatusError as exc:
                return _status(exc)
        usage = self.usage
        if usage is not None:
            try:
                usage.check_admitting()  # 503 while fail-closed billing is backed up
            except StatusError as exc:
                return _status(exc)
        ids = hashes = None
        encoder = fleet.encoder()
        if encoder is not None and parsed is not None:
            ids = encoder.request_ids(path, parsed)
            if ids is not None:  # salted as the replica salts the caller's blocks
                hashes = encoder.block_hashes(ids, key.salt if key is not None else None)
        stream = bool(parsed.get("stream")) if parsed is not None else False
        out_headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS
                       and not k.lower().startswith(PRIVATE_HEADER_PREFIX)}
        secret = fleet.secret
        can_resume = secret is not None and parsed is not None and resumable(path, parsed)
        if secret is not None and (can_resume or key is not None or usage is not None):
            out_headers[GATEWAY_SECRET_HEADER] = secret
        extensions = [TOKEN_IDS] if can_resume else []
        if secret is not None and usage is not None and stream:
            extensions.append(USAGE)  # the replica's own count, for the ledger record
        if extensions:
            out_headers[EXTENSIONS_HEADER] = ",".join(extensions)
        if key is not None and secret is not None:  # the replica trusts our caller
            out_headers = {k: v for k, v in out_headers.items() if k.lower() != "authorization"}
            out_headers[TENANT_HEADER] = key.tenant
            out_headers[CACHE_SALT_HEADER] = key.salt
        call = _Call(method, path, out_headers, body, parsed, stream,
                     headers.get("x-session-id"), ids, hashes, can_resume, trace=trace)
        if trace is not None:
            trace.describe(parsed.get("model") if parsed is not None else None, stream)
        if edge is None:
            return self._ledgered(await self._send_recorded(self._begin(call, key)), call)
        try:
            admission, reserved = await edge.reserve(key, path, parsed, ids)
        except StatusError as exc:
            return _status(exc)
        try:
            response = await self._send_recorded(self._begin(call, key))
        except BaseException:
            await edge.settle(admission, reserved)
            raise
        response.headers.update(admission.headers)
        if isinstance(response, _RelayResponse):

            async def settle() -> None:  # with what the stream used, once it is over
                await edge.settle(admission, call.used if call.used is not None else reserved)

            response.on_close.append(settle)
        else:
            used = call.used if call.used is not None else (
                0 if response.status_code >= 400 else reserved)
            await edge.settle(admission, used)
        return self._ledgered(response, call)

    def _begin(self, call: _Call, key: Any) -> _Call:
        """Open ``call``'s ledger record when the gateway records usage."""
        if self.usage is not None:
            model = call.parsed.get("model") if call.parsed is not None else None
            call.ledger = Ledger(self.usage, key, call.headers, str(model or ""),
                                 len(call.ids) if call.ids is not None else None)
        return call

    async def _send_recorded(self, call: _Call) -> Response:
        """:meth:`_send`; a request that fails or is cancelled before it has a response is
        recorded on the way out."""
        try:
            return await self._send(call)
        except BaseException:
            if call.ledger is not None:
                call.ledger.close()
            raise

    @staticmethod
    def _ledgered(response: Response, call: _Call) -> Response:
        """``response`` recording ``call``'s ledger record as it goes out."""
        ledger = call.ledger
        if ledger is None:
            return response
        ledger.status = response.status_code
        return LedgerResponse(response, ledger, whole=not isinstance(response, StreamingResponse))

    async def _send(self, call: _Call) -> Response:
        """Route and send ``call``, retrying before the first byte."""
        self.budget.request()
        last: Response | None = None
        why = "first"
        while True:
            url = self._route(call, why)
            why = "retry"
            if url is None:
                return last if last is not None else unavailable(
                    "no replica is available; retry later")
            result = await self._attempt(url, call)
            if isinstance(result, Response):
                return result
            last = result[1]
            if not self.budget.try_retry():
                return last
            self.metrics.retry(url)

    def _route(self, call: _Call, why: str) -> str | None:
        """The next replica for ``call`` (one it has not tried), or None when none is left;
        ``why`` it is tried (first, retry, resume) goes in its trace."""
        try:
            url = self.fleet.router.route(session_id=call.session, token_ids=call.ids,
                                          block_hashes=call.hashes, exclude=call.tried).node
        except NoNodeAvailableError:
            return None
        call.tried.add(url)
        call.joined = self.fleet.joined.get(url)
        if call.ledger is not None:
            call.ledger.replicas.append(url)
        hashes = call.hashes
        held = self.fleet.index.cached_blocks(hashes).get(url, 0) if hashes else 0
        self.metrics.routed(url, "cache_hit" if held else "load")
        encoder = self.fleet.encoder()
        call.predicted = held * encoder.block_size if hashes and encoder is not None else None
        if call.trace is not None:
            call.trace.attempt(url, why, call.headers)
        return url

    def _cached(self, call: _Call, url: str, actual: int | None) -> None:
        """``call``'s request on ``url`` reported ``actual`` cached prompt tokens (None: it
        did not say); counted beside the prediction, when there was one."""
        if actual is not None and call.predicted is not None:
            self.metrics.cached(url, call.predicted, actual)

    def _outcome(self, call: _Call, url: str, outcome: str) -> None:
        """An attempt of ``call`` on ``url`` ended with ``outcome``."""
        self.metrics.outcome(url, outcome)
        if call.trace is not None:
            call.trace.end_attempt(outcome)

    async def _attempt(self, url: str, call: _Call) -> Response | tuple[str, Response]:
        """A committed response, or ``("retry", response-if-none-else)``."""
        stream = call.stream
        try:
            upstream = await self._open(url, call, call.body)
        except httpx.TransportError as exc:
            self._release(call, url, False)
            self._outcome(call, url, "connect_error")
            return "retry", unavailable(f"replica unreachable: {type(exc).__name__}")
        if upstream.status_code in RETRYABLE_STATUS:
            content = await self._drain(url, call, upstream)
            self._release(call, url, False if upstream.status_code == 503 else None)
            self._outcome(call, url, str(upstream.status_code))
            return "retry", _copy(upstream, content)
        chunks = upstream.aiter_raw()
        try:
            if not stream:
                content = await upstream.aread()
            else:
                first = await anext(chunks, b"")
        except httpx.TransportError as exc:
            await upstream.aclose()
            self._release(call, url, False)
            self._outcome(call, url, "reset")
            return "retry", unavailable(f"replica failed: {type(exc).__name__}")
        except BaseException:  # the client went away before the first byte
            await upstream.aclose()
            self._gone(call, url)
            raise
        if not stream:
            await upstream.aclose()
            self._release(call, url, upstream.status_code < 500)
            self._outcome(call, url, str(upstream.status_code))
            call.used = usage_total(content) if upstream.status_code == 200 else None
            if upstream.status_code == 200:
                self._cached(call, url, cached_total(content))
            if call.ledger is not None:
                call.ledger.body = content
                call.ledger.request_id = upstream.headers.get("x-request-id")
            return _copy(upstream, content)
        ledger = call.ledger
        if ledger is not None:
            ledger.request_id = upstream.headers.get("x-request-id")
            ledger.first_at = time.monotonic()
        granted = upstream.headers.get(EXTENSIONS_HEADER, "") if upstream.status_code == 200 \
            else ""
        if (call.resumable and TOKEN_IDS in granted) or USAGE in granted:
            relay = self._relay_tracked(url, upstream, first, chunks, call,
                                        call.resumable and TOKEN_IDS in granted)
        else:  # not servekit (no token ids): a cut stream ends early
            relay = self._relay(url, upstream, first, chunks, call)
        call.handed = url, upstream
        response = _RelayResponse(relay, upstream.status_code, _response_headers(upstream))
        response.on_close.append(lambda: self._unrelayed(call))
        return response

    async def _unrelayed(self, call: _Call) -> None:
        """The response is over and its relay never started: end the attempt it was handed."""
        handed, call.handed = call.handed, None
        if handed is not None:
            url, upstream = handed
            await upstream.aclose()
            self._gone(call, url)

    async def _relay_tracked(self, url: str, upstream: UpstreamResponse, first: bytes,
                             chunks: AsyncIterator[bytes], call: _Call,
                             resume: bool) -> AsyncIterator[bytes]:
        """Relay a stream with servekit's extensions (stripped); with ``resume`` (token ids),
        resume it elsewhere when it breaks before [DONE]. The ledger record is appended
        before the chunk holding [DONE] goes out."""
        n = call.parsed.get("n", 1) if call.parsed is not None else 1
        tracker = StreamTracker(n if isinstance(n, int) else 1)
        ledger = call.ledger
        if ledger is not None:
            ledger.tracker = tracker
        failovers = 0
        prompt = len(call.ids) if call.ids is not None else 0
        while True:
            ok: bool | None = None
            try:
                data = tracker.feed(first)  # may hold the whole stream: one read's worth
                if data:
                    call.used = prompt + tracker.num_tokens
                    if tracker.done and ledger is not None:
                        ledger.before_final()
                    yield data
                async for chunk in chunks:  # each: all that the socket held
                    data = tracker.feed(chunk)
                    if data:
                        call.used = prompt + tracker.num_tokens
                        if tracker.done and ledger is not None:
                            ledger.before_final()
                        yield data
                if ledger is not None and tracker.done:
                    ledger.after_final()
                if tracker.usage is not None:  # the replica's own count
                    call.used = (_int(tracker.usage.get("prompt_tokens"))
                                 + _int(tracker.usage.get("completion_tokens")))
                elif tracker.done and data:  # the usage chunk, when the client asked for it
                    call.used = usage_total(data) or call.used
                if tracker.done and failovers == 0:  # a resumed attempt prefilled more
                    cached = tracker.usage.get("cached_tokens") if tracker.usage else None
                    self._cached(call, url, cached if isinstance(cached, int) else
                                 cached_total(data) if data else None)
                # EOF without [DONE]: the replica died mid-write (a drain is no failure)
                ok = True if tracker.done else (None if tracker.drained else False)
            except httpx.TransportError:
                ok = False
            finally:
                call.handed = None
                await upstream.aclose()
                self._release(call, url, ok)
                self._outcome(call, url, "stream_ok" if ok else
                              ("stream_cut" if ok is False else
                               "stream_drained" if tracker.drained else "client_gone"))
            if tracker.done or not resume:
                return
            tracker.cut()
            self.metrics.failover(url)
            if call.trace is not None:
                call.trace.failed_over()
            resumed = None
            while resumed is None and failovers < self.max_failovers:
                failovers += 1
                resumed = await self._resume(call, tracker)
            if resumed is None:
                if ledger is not None:
                    ledger.failed = True
                    ledger.before_final()
                yield error_event(json.dumps({"error": {
                    "message": "the replica serving this stream failed and no replica could "
                               "resume it", "type": "service_unavailable", "param": None,
                    "code": "stream_interrupted"}}).encode()) + DONE
                if ledger is not None:
                    ledger.after_final()
                return
            url, upstream = resumed
            chunks, first = upstream.aiter_raw(), b""

    async def _resume(self, call: _Call, tracker: StreamTracker
                      ) -> tuple[str, UpstreamResponse] | None:
        """A replica's response continuing ``tracker``'s stream, or None (this try failed)."""
        assert call.parsed is not None
        url = self._route(call, "resume")
        if url is None:
            call.tried.clear()  # every replica failed once: any may take the next try
            url = self._route(call, "resume")
            if url is None:
                return None
        try:
            upstream = await self._open(url, call, resume_body(call.parsed, tracker))
        except httpx.TransportError:
            self._release(call, url, False)
            self._outcome(call, url, "connect_error")
            return None
        if upstream.status_code != 200:
            await self._drain(url, call, upstream)
            self._release(call, url, False if upstream.status_code >= 500 else None)
            self._outcome(call, url, str(upstream.status_code))
            return None
        return url, upstream

    async def _open(self, url: str, call: _Call, body: bytes) -> UpstreamResponse:
        """Send ``call`` (with ``body``) to ``url``, which :meth:`_route` counted in flight;
        the response once its head arrived. A transport error is the caller's to count; any
        other way out (the client gone while the head is awaited) releases ``url`` here."""
        try:
            return await self.client.send(call.method, url + call.path,
                                          _attempt_headers(call), body)
        except httpx.TransportError:
            raise
        except BaseException:
            self._gone(call, url)
            raise

    async def _drain(self, url: str, call: _Call, upstream: UpstreamResponse) -> bytes:
        """The body of ``url``'s refusal, read and closed; the client gone meanwhile
        releases ``url`` here (the caller releases it otherwise)."""
        try:
            return await _read_quietly(upstream)
        except BaseException:
            self._gone(call, url)
            raise

    def _release(self, call: _Call, url: str, success: bool | None) -> None:
        """``call``'s attempt on ``url`` ended: released on the replica it was routed to, not
        on its return (when it left the fleet and came back meanwhile)."""
        self.fleet.release(url, success, call.joined)

    def _gone(self, call: _Call, url: str) -> None:
        """``call``'s attempt on ``url`` ended without an outcome: the client went away."""
        self._release(call, url, None)
        self._outcome(call, url, "client_gone")

    async def _relay(self, url: str, upstream: UpstreamResponse, first: bytes,
                     chunks: AsyncIterator[bytes], call: _Call) -> AsyncIterator[bytes]:
        ok: bool | None = None
        prev = last = first  # the usage chunk, when asked for, comes right before [DONE]
        ledger = call.ledger
        try:
            if first:
                if ledger is not None and _DONE in first:
                    ledger.body = first
                    ledger.before_final()
                yield first
            async for chunk in chunks:
                prev, last = last, chunk
                if ledger is not None and _DONE in chunk:
                    ledger.body = prev + last
                    ledger.before_final()
                yield chunk
            if ledger is not None:
                ledger.after_final()
            ok = upstream.status_code < 500
            if upstream.status_code == 200:
                self._cached(call, url, cached_total(prev + last))
        except httpx.TransportError:
            ok = False  # cut mid-stream: the client sees its stream end early
        finally:
            call.used = usage_total(prev + last)
            if ledger is not None and ledger.body is None:
                ledger.body = prev + last
            call.handed = None
            await upstream.aclose()
            self._release(call, url, ok)
            self._outcome(call, url, "stream_ok" if ok else
                          ("stream_cut" if ok is False else "client_gone"))


def _attempt_headers(call: _Call) -> dict[str, str]:
    """The headers of one attempt: with a ledger, its attempt key (the replica records the
    attempt under it, for analytics only)."""
    if call.ledger is None:
        return call.headers
    return {**call.headers, ATTEMPT_HEADER: call.ledger.next_attempt()}


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _status(exc: StatusError) -> Response:
    """An OpenAI error response for ``exc``."""
    return Response(exc.body(), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


async def _read_quietly(upstream: UpstreamResponse) -> bytes:
    try:
        return await upstream.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await upstream.aclose()


def _response_headers(upstream: UpstreamResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS
            and k.lower() != "content-encoding" and not k.lower().startswith(PRIVATE_HEADER_PREFIX)}


def _copy(upstream: UpstreamResponse, content: bytes) -> Response:
    return Response(content, status_code=upstream.status_code,
                    headers=_response_headers(upstream))
