"""Sync and async HTTP clients for servekit's (and any) OpenAI-compatible server.

Both twins share one core (:mod:`servekit.client._core`): the same request bodies, retry
policy, error mapping and stream decoding; only the I/O differs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import anyio

from servekit._optional import require
from servekit.client._chat import AsyncChatMethods, ChatMethods
from servekit.client._core import (
    RetryPolicy,
    Timeout,
    _RetryingBase,
    auth_headers,
    decode_event,
    error_from_response,
    request_body,
)
from servekit.client.errors import APIConnectionError, APITimeoutError, ClientError
from servekit.client.types import ChatCompletion, Completion
from servekit.protocol.sse import DONE_DATA, aiter_events, iter_events

httpx = require("httpx", "client")

T = TypeVar("T", Completion, ChatCompletion)
Message = Mapping[str, Any]
DEFAULT_TIMEOUT = Timeout()
# A stream that ends without its terminator was cut off (proxy, server crash), not finished.
_CUT_OFF = "the stream ended before 'data: [DONE]': the response is incomplete"


class _Base(_RetryingBase):
    def __init__(self, base_url: str, api_key: str | None, timeout: Timeout,
                 retry: RetryPolicy | None) -> None:
        super().__init__(timeout, retry)
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self._headers = {"content-type": "application/json", **auth_headers(api_key)}

    def _httpx_timeout(self, remaining: float | None) -> Any:
        read, connect = self.timeout.read, self.timeout.connect
        if remaining is not None:  # no phase may outlast the total
            read, connect = min(read, remaining), min(connect, remaining)
        return httpx.Timeout(read, connect=connect)

    @staticmethod
    def _transport_error(exc: Exception) -> ClientError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"timed out: {exc}")
        return APIConnectionError(f"connection failed: {exc}")


def _completion_params(model: str, prompt: str | Sequence[int], params: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt), **params}


def _chat_params(model: str, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "messages": list(messages), **params}


class Client(_Base, ChatMethods):
    """Blocking client: ``complete``, ``chat``, their ``stream_*`` twins, and ``models``.

    Extra keyword arguments are sent as request fields (``max_tokens``, ``temperature``, ``stop``,
    ``seed``, ...). Retries 429 / 503 / connection errors per ``retry``, waiting what
    ``retry-after`` says; a stream is retried only before its first byte.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: Timeout = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None,
                 transport: Any = None) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._http = httpx.Client(headers=self._headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> Completion:
        """``POST /v1/completions``."""
        return Completion.from_json(self._post("/completions", _completion_params(model, prompt, params)))

    def chat(self, model: str, messages: Sequence[Message], **params: Any) -> ChatCompletion:
        """``POST /v1/chat/completions``."""
        return ChatCompletion.from_json(self._post("/chat/completions", _chat_params(model, messages, params)))

    def stream_complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> Iterator[Completion]:
        """Stream a completion as chunks; the last one carries ``usage``."""
        return self._stream("/completions", _completion_params(model, prompt, params), Completion)

    def stream_chat(self, model: str, messages: Sequence[Message], **params: Any) -> Iterator[ChatCompletion]:
        """Stream a chat completion as chunks (``message`` holds each delta)."""
        return self._stream("/chat/completions", _chat_params(model, messages, params), ChatCompletion)

    def models(self) -> list[str]:
        """The ids of the models the server serves."""
        data = self._request("GET", "/models", None)
        return [m["id"] for m in data.get("data", [])]

    def _post(self, path: str, params: dict[str, Any]) -> Any:
        return self._request("POST", path, request_body(params, stream=False))

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        response = self._send(method, path, body, stream=False)
        return response.json()

    def _send(self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool) -> Any:
        deadline = self._deadline()
        attempt = 0
        while True:
            remaining = self._remaining(deadline)
            request = self._http.build_request(method, self.base_url + path, json=body,
                                               timeout=self._httpx_timeout(remaining))
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: ClientError = self._transport_error(exc)
            else:
                if response.status_code < 400:
                    return response
                content = response.read()
                response.close()
                error = error_from_response(response.status_code, response.headers, content)
            time.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1

    def _stream(self, path: str, params: dict[str, Any], cls: type[T]) -> Iterator[T]:
        response = self._send("POST", path, request_body(params, stream=True), stream=True)
        try:
            for data in iter_events(response):
                payload = decode_event(data)
                if payload == DONE_DATA:
                    return
                yield cls.from_json(payload)
            raise APIConnectionError(_CUT_OFF)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        finally:
            response.close()


class AsyncClient(_Base, AsyncChatMethods):
    """The async twin of :class:`Client` (anyio: asyncio and trio)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: Timeout = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None,
                 transport: Any = None) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._http = httpx.AsyncClient(headers=self._headers, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> Completion:
        """``POST /v1/completions``."""
        return Completion.from_json(await self._post("/completions", _completion_params(model, prompt, params)))

    async def chat(self, model: str, messages: Sequence[Message], **params: Any) -> ChatCompletion:
        """``POST /v1/chat/completions``."""
        return ChatCompletion.from_json(await self._post("/chat/completions", _chat_params(model, messages, params)))

    def stream_complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> AsyncIterator[Completion]:
        """Stream a completion as chunks; the last one carries ``usage``."""
        return self._stream("/completions", _completion_params(model, prompt, params), Completion)

    def stream_chat(self, model: str, messages: Sequence[Message], **params: Any) -> AsyncIterator[ChatCompletion]:
        """Stream a chat completion as chunks (``message`` holds each delta)."""
        return self._stream("/chat/completions", _chat_params(model, messages, params), ChatCompletion)

    async def models(self) -> list[str]:
        """The ids of the models the server serves."""
        data = await self._request("GET", "/models", None)
        return [m["id"] for m in data.get("data", [])]

    async def _post(self, path: str, params: dict[str, Any]) -> Any:
        return await self._request("POST", path, request_body(params, stream=False))

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        response = await self._send(method, path, body, stream=False)
        return response.json()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool) -> Any:
        deadline = self._deadline()
        attempt = 0
        while True:
            remaining = self._remaining(deadline)
            request = self._http.build_request(method, self.base_url + path, json=body,
                                               timeout=self._httpx_timeout(remaining))
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: ClientError = self._transport_error(exc)
            else:
                if response.status_code < 400:
                    return response
                content = await response.aread()
                await response.aclose()
                error = error_from_response(response.status_code, response.headers, content)
            await anyio.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1

    async def _stream(self, path: str, params: dict[str, Any], cls: type[T]) -> AsyncIterator[T]:
        response = await self._send("POST", path, request_body(params, stream=True), stream=True)
        try:
            async for data in aiter_events(response):
                payload = decode_event(data)
                if payload == DONE_DATA:
                    return
                yield cls.from_json(payload)
            raise APIConnectionError(_CUT_OFF)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await response.aclose()
