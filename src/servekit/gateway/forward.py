"""One request through the gateway: route, send, retry before the first byte, relay.

Before anything reaches the client, a connect error, a reset, a 503 or a replica's 429 sends
the request to a replica not yet tried (the router's next choice), while the
:class:`~servekit.gateway.budget.RetryBudget` allows. A stream is committed once its first
chunk has arrived; after that a failure ends the stream. A client that goes away closes the
upstream connection, which aborts the request on the replica.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from servekit.gateway.budget import RetryBudget
from servekit.gateway.fleet import Fleet
from servekit.gateway.metrics import GatewayMetrics
from servekit.route import NoNodeAvailableError

RETRYABLE_STATUS = frozenset({429, 503})
_HOP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive",
                          "transfer-encoding", "te", "upgrade", "proxy-authorization"})
_ALL_DOWN_RETRY_AFTER = 1


def unavailable(message: str, retry_after: int = _ALL_DOWN_RETRY_AFTER) -> JSONResponse:
    """The 503 the gateway answers when no replica can take the request."""
    return JSONResponse({"error": {"message": message, "type": "service_unavailable",
                                   "param": None, "code": "no_replica_available"}},
                        status_code=503, headers={"retry-after": str(retry_after)})


class Forwarder:
    """Sends requests to the fleet's replicas over one pooled keep-alive client."""

    def __init__(self, fleet: Fleet, client: httpx.AsyncClient, budget: RetryBudget,
                 metrics: GatewayMetrics) -> None:
        self.fleet, self.client, self.budget, self.metrics = fleet, client, budget, metrics

    async def forward(self, method: str, path: str, headers: Mapping[str, str],
                      body: bytes) -> Response:
        """Forward one request; the response the client gets."""
        fleet, router = self.fleet, self.fleet.router
        parsed = _json(body)
        session = headers.get("x-session-id")
        ids = hashes = None
        encoder = fleet.encoder()
        if encoder is not None and parsed is not None:
            ids = encoder.request_ids(path, parsed)
            if ids is not None:
                hashes = encoder.block_hashes(ids)
        stream = bool(parsed.get("stream")) if parsed is not None else False
        out_headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        self.budget.request()
        tried: set[str] = set()
        last: Response | None = None
        while True:
            try:
                route = router.route(session_id=session, token_ids=ids, block_hashes=hashes,
                                     exclude=tried)
            except NoNodeAvailableError:
                return last if last is not None else unavailable(
                    "no replica is available; retry later")
            url = route.node
            tried.add(url)
            held = fleet.index.cached_blocks(hashes).get(url, 0) if hashes else 0
            self.metrics.routed(url, "cache_hit" if held else "load")
            result = await self._attempt(url, method, path, out_headers, body, stream)
            if isinstance(result, Response):
                return result
            last = result[1]
            if not self.budget.try_retry():
                return last
            self.metrics.retry(url)

    async def _attempt(self, url: str, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, stream: bool) -> Response | tuple[str, Response]:
        """A committed response, or ``("retry", response-if-none-else)``."""
        router = self.fleet.router
        request = self.client.build_request(method, url + path, headers=headers, content=body)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            router.release(url, False)
            self.metrics.outcome(url, "connect_error")
            return "retry", unavailable(f"replica unreachable: {type(exc).__name__}")
        if upstream.status_code in RETRYABLE_STATUS:
            content = await _read_quietly(upstream)
            router.release(url, False if upstream.status_code == 503 else None)
            self.metrics.outcome(url, str(upstream.status_code))
            return "retry", _copy(upstream, content)
        chunks = upstream.aiter_raw()
        try:
            if not stream:
                content = await upstream.aread()
            else:
                first = await anext(chunks, b"")
        except httpx.TransportError as exc:
            await upstream.aclose()
            router.release(url, False)
            self.metrics.outcome(url, "reset")
            return "retry", unavailable(f"replica failed: {type(exc).__name__}")
        if not stream:
            await upstream.aclose()
            router.release(url, upstream.status_code < 500)
            self.metrics.outcome(url, str(upstream.status_code))
            return _copy(upstream, content)
        return StreamingResponse(self._relay(url, upstream, first, chunks),
                                 status_code=upstream.status_code,
                                 headers=_response_headers(upstream))

    async def _relay(self, url: str, upstream: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        ok: bool | None = None
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
            ok = upstream.status_code < 500
        except httpx.TransportError:
            ok = False  # cut mid-stream: the client sees its stream end early
        finally:
            await upstream.aclose()
            self.fleet.router.release(url, ok)
            self.metrics.outcome(url, "stream_ok" if ok else
                                 ("stream_cut" if ok is False else "client_gone"))


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


async def _read_quietly(upstream: httpx.Response) -> bytes:
    try:
        return await upstream.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await upstream.aclose()


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS
            and k.lower() != "content-encoding"}


def _copy(upstream: httpx.Response, content: bytes) -> Response:
    return Response(content, status_code=upstream.status_code,
                    headers=_response_headers(upstream))
