"""Sync and async gRPC clients for ``servekit.v1.Generation``, shaped like the HTTP clients.

:class:`GrpcClient` and :class:`AsyncGrpcClient` have the calls of
:class:`~servekit.client.Client`: ``complete``, ``chat`` and their ``stream_*`` twins, with the
same keyword parameters (``max_tokens``, ``temperature``, ``stop``, ``seed``, ...), the same
typed results (:class:`Completion`, :class:`ChatCompletion`, a usage-only last chunk on
streams), the same exceptions and the same retries (RESOURCE_EXHAUSTED, UNAVAILABLE, waiting
what ``retry-after-ms`` / ``retry-after`` in the trailing metadata say; a stream only before its
first chunk). ``session()`` opens one bidirectional stream on which many requests run at once::

    with GrpcClient("127.0.0.1:50051", api_key="sk-...") as client:
        print(client.complete("servekit-demo", "ROMEO:", max_tokens=32).text)
        with client.session() as session:
            a = session.complete("servekit-demo", "ROMEO:", max_tokens=32)
            b = session.chat("servekit-demo", [{"role": "user", "content": "hi"}])
            a.cancel()                  # aborts a; b goes on
            print(b.result().text)

The async client runs on asyncio (grpc.aio does not run on trio).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from servekit._optional import require
from servekit.client._chat import AsyncChatMethods, ChatMethods
from servekit.client._core import RetryPolicy, Timeout, _RetryingBase, auth_headers
from servekit.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ClientError,
    error_for_status,
)
from servekit.client.types import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    ToolCall,
    Usage,
)

grpc = require("grpc", "grpc")
require("google.rpc", "grpc")
from google.rpc import code_pb2, error_details_pb2, status_pb2  # noqa: E402

from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["AsyncGrpcClient", "AsyncSession", "AsyncSessionCall", "GrpcClient", "Session",
           "SessionCall", "error_from_status"]

T = TypeVar("T", Completion, ChatCompletion)
Message = Mapping[str, Any]
DEFAULT_TIMEOUT = Timeout()
DETAILS_KEY = "grpc-status-details-bin"

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error",
           pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
# google.rpc.Code -> the HTTP status whose exception class the HTTP client raises
_HTTP_STATUS = {code_pb2.INVALID_ARGUMENT: 400, code_pb2.UNAUTHENTICATED: 401,
                code_pb2.PERMISSION_DENIED: 403, code_pb2.NOT_FOUND: 404,
                code_pb2.RESOURCE_EXHAUSTED: 429, code_pb2.UNAVAILABLE: 503,
                code_pb2.FAILED_PRECONDITION: 400, code_pb2.UNIMPLEMENTED: 501}
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty")
_INTS = ("top_k", "seed", "n")


# -- requests ------------------------------------------------------------------------------

def build_request(model: str, *, prompt: str | Sequence[int] | None = None,
                  messages: Sequence[Message] | None = None, request_id: str = "",
                  **params: Any) -> Any:
    """A ``GenerateRequest`` from the HTTP client's arguments (``None`` values are left unset).

    ``max_completion_tokens`` is ``max_tokens``; chat's ``logprobs=True`` with ``top_logprobs=k``
    is ``logprobs=k``. ``response_format``, ``tools``, ``tool_choice`` and messages' ``tool_calls``
    take the HTTP API's (OpenAI's) shapes; JSON schemas go as JSON text. An unknown parameter
    is a TypeError.
    """
    req = pb.GenerateRequest(model=model, request_id=request_id)
    if messages is not None:
        req.chat.messages.extend(_message(m) for m in messages)
    elif isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.prompt_token_ids.ids.extend(prompt)
    params = {k: v for k, v in params.items() if v is not None}
    max_tokens = params.pop("max_completion_tokens", params.pop("max_tokens", None))
    if max_tokens is not None:
        req.max_tokens = max_tokens
    logprobs, top = params.pop("logprobs", None), params.pop("top_logprobs", None)
    if logprobs is True:
        req.logprobs = top or 0
    elif logprobs is not None and logprobs is not False:
        req.logprobs = logprobs
    stop = params.pop("stop", None)
    if stop is not None:
        req.stop.extend([stop] if isinstance(stop, str) else stop)
    response_format = params.pop("response_format", None)
    if response_format is not None:
        req.response_format.CopyFrom(_response_format(response_format))
    req.tools.extend(_tool(t) for t in params.pop("tools", None) or ())
    tool_choice = params.pop("tool_choice", None)
    if isinstance(tool_choice, str):
        req.tool_choice.mode = tool_choice
    elif tool_choice is not None:
        req.tool_choice.function = tool_choice["function"]["name"]
    for name in ("ignore_eos", "user", "parallel_tool_calls", "skip_special_tokens",
                 *_FLOATS, *_INTS):
        if name in params:
            setattr(req, name, params.pop(name))
    params.pop("stream", None)
    params.pop("stream_options", None)
    if params:
        raise TypeError(f"unknown parameter(s) for a gRPC request: {sorted(params)}")
    return req


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _message(m: Mapping[str, Any]) -> Any:
    calls = [pb.ToolCall(id=c.get("id") or "", type=c.get("type") or "function",
                         function=pb.FunctionCall(name=c["function"]["name"],
                                                  arguments=_json(c["function"]["arguments"])))
             for c in m.get("tool_calls") or ()]
    return pb.ChatMessage(role=m.get("role", ""), content=m.get("content") or "",
                          name=m.get("name") or "", tool_calls=calls,
                          tool_call_id=m.get("tool_call_id") or "")


def _response_format(fmt: Mapping[str, Any]) -> Any:
    out = pb.ResponseFormat(type=fmt.get("type", ""))
    spec = fmt.get("json_schema")
    if spec is not None:
        out.json_schema.CopyFrom(pb.JsonSchemaFormat(
            name=spec.get("name", ""), strict=bool(spec.get("strict", False)),
            description=spec.get("description", ""),
            schema=_json(spec["schema"]) if "schema" in spec else ""))
    out.structures.extend(pb.StructuralTag(begin=t["begin"], schema=_json(t["schema"]),
                                           end=t["end"]) for t in fmt.get("structures") or ())
    out.triggers.extend(fmt.get("triggers") or ())
    out.at_least_one = bool(fmt.get("at_least_one", False))
    out.stop_after_first = bool(fmt.get("stop_after_first", False))
    return out


def _tool(tool: Mapping[str, Any]) -> Any:
    fn = tool.get("function") or {}
    return pb.Tool(type=tool.get("type", ""), function=pb.FunctionDefinition(
        name=fn.get("name", ""), description=fn.get("description", ""),
        parameters=_json(fn["parameters"]) if "parameters" in fn else "",
        strict=bool(fn.get("strict", False))))


# -- responses -----------------------------------------------------------------------------

def _usage(u: Any) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def _logprobs(items: Sequence[Any]) -> dict[str, Any] | None:
    if not items:
        return None
    return {"token_ids": [lp.token_id for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{t.token_id: t.logprob for t in lp.top} for lp in items]}


def _completion(resp: Any) -> Completion:
    return Completion(resp.id, resp.model, resp.created, tuple(
        CompletionChoice(c.index, c.text, _FINISH.get(c.finish_reason), _logprobs(c.logprobs))
        for c in resp.choices), _usage(resp.usage))


def _tool_calls(calls: Sequence[Any]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.function.name, c.function.arguments, c.index) for c in calls)


def _chat(resp: Any) -> ChatCompletion:
    return ChatCompletion(resp.id, resp.model, resp.created, tuple(
        ChatChoice(c.index, ChatMessage("assistant", c.text, _tool_calls(c.tool_calls)),
                   _FINISH.get(c.finish_reason), _logprobs(c.logprobs))
        for c in resp.choices), _usage(resp.usage))


class _ChunkParser(Generic[T]):
    """``GenerateChunk`` -> a Completion / ChatCompletion chunk; remembers model and created."""

    def __init__(self, cls: type[T], model: str) -> None:
        self.cls: type[T] = cls
        self.model = model
        self.created = 0

    def __call__(self, chunk: Any) -> T:
        role = None
        if chunk.model:  # the first chunk
            self.model, self.created, role = chunk.model, chunk.created, "assistant"
        if chunk.final:
            return self.cls(chunk.id, self.model, self.created, (), _usage(chunk.usage))
        reason, lps = _FINISH.get(chunk.finish_reason), _logprobs(chunk.logprobs)
        if self.cls is ChatCompletion:
            choice: Any = ChatChoice(chunk.index, ChatMessage(role, chunk.text,
                                                              _tool_calls(chunk.tool_calls)),
                                     reason, lps)
        else:
            choice = CompletionChoice(chunk.index, chunk.text, reason, lps)
        return self.cls(chunk.id, self.model, self.created, (choice,), None)


def _join_calls(pieces: Sequence[ToolCall]) -> tuple[ToolCall, ...]:
    """A message's calls from its streamed pieces: id and name from a call's first piece,
    the arguments of all its pieces joined, in index order."""
    heads: dict[int, ToolCall] = {}
    args: dict[int, list[str]] = {}
    for piece in pieces:
        heads.setdefault(piece.index, piece)
        args.setdefault(piece.index, []).append(piece.arguments)
    return tuple(ToolCall(h.id, h.name, "".join(args[i]), i) for i, h in sorted(heads.items()))


def _collect(cls: type[T], chunks: Sequence[T]) -> T:
    """One whole response from a stream's chunks."""
    texts: dict[int, list[str]] = {}
    calls: dict[int, list[ToolCall]] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text = c.message.content if isinstance(c, ChatChoice) else c.text
            texts.setdefault(c.index, []).append(text)
            if isinstance(c, ChatChoice):  # streamed calls come in pieces
                calls.setdefault(c.index, []).extend(c.message.tool_calls)
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    first = chunks[0] if chunks else None
    choices: tuple[Any, ...]
    if cls is ChatCompletion:
        choices = tuple(ChatChoice(i, ChatMessage("assistant", "".join(t),
                                                  _join_calls(calls.get(i, ()))), reasons.get(i))
                        for i, t in sorted(texts.items()))
    else:
        choices = tuple(CompletionChoice(i, "".join(t), reasons.get(i))
                        for i, t in sorted(texts.items()))
    return cls(first.id if first else "", first.model if first else "",
               first.created if first else 0, choices, usage)


# -- errors --------------------------------------------------------------------------------

def error_from_status(status: Any, headers: Mapping[str, str] | None = None) -> APIStatusError:
    """The client exception of a ``google.rpc.Status`` (field, code and headers from its details)."""
    body: dict[str, Any] = {"message": status.message}
    merged = dict(headers or {})
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            meta = dict(info.metadata)
            body["type"] = meta.pop("type", None)
            body["param"] = meta.pop("param", None)
            body["code"] = info.reason.lower()
            for k, v in meta.items():
                merged.setdefault(k, v)
        elif detail.Unpack(bad) and bad.field_violations:
            body.setdefault("param", bad.field_violations[0].field)
    http = _HTTP_STATUS.get(status.code, 500)
    err = error_for_status(http, body, merged)
    err.args = (f"{code_pb2.Code.Name(status.code)}: {status.message}",)
    return err


def _map_rpc_error(exc: Any) -> ClientError:
    """The client exception of a failed call (grpc.RpcError or grpc.aio.AioRpcError)."""
    code = exc.code()
    trailing = exc.trailing_metadata() or ()
    headers = {k: v for k, v in trailing if not k.endswith("-bin")}
    raw = next((v for k, v in trailing if k == DETAILS_KEY), None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APITimeoutError(f"timed out: {exc.details()}")
    if raw is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return APIConnectionError(f"connection failed: {exc.details()}")
    status = status_pb2.Status()
    if raw is not None:
        status.ParseFromString(raw)
    else:
        status.code, status.message = code.value[0], exc.details() or code.name
    return error_from_status(status, headers)


class _Base(_RetryingBase):
    def __init__(self, target: str, api_key: str | None, timeout: Timeout,
                 retry: RetryPolicy | None, credentials: Any, options: Sequence[tuple[str, Any]]
                 ) -> None:
        super().__init__(timeout, retry)
        self.target = target
        self.credentials = credentials
        self.options = tuple(options)
        self.metadata = tuple(auth_headers(api_key).items())
        self._ids = itertools.count()

    def _call_timeout(self, deadline: float | None, unary: bool) -> float | None:
        remaining = self._remaining(deadline)
        if not unary:
            return remaining  # a stream has no per-read deadline in gRPC: only the total
        return self.timeout.read if remaining is None else min(self.timeout.read, remaining)


# -- sync ----------------------------------------------------------------------------------

class GrpcClient(_Base, ChatMethods):
    """Blocking gRPC client: ``complete``, ``chat``, ``stream_complete``, ``stream_chat``, ``session``.

    ``target`` is ``host:port``; ``credentials`` (``grpc.ssl_channel_credentials()``) makes the
    channel secure.
    """

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, *,
                 timeout: Timeout = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None,
                 credentials: Any = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, api_key, timeout, retry, credentials, options)
        self._channel = (grpc.secure_channel(target, credentials, self.options) if credentials
                         else grpc.insecure_channel(target, self.options))
        self._stub = pb_grpc.GenerationStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> Completion:
        """``Generate`` with a prompt (text or token ids)."""
        return _completion(self._unary(build_request(model, prompt=prompt, **params)))

    def chat(self, model: str, messages: Sequence[Message], **params: Any) -> ChatCompletion:
        """``Generate`` with chat messages."""
        return _chat(self._unary(build_request(model, messages=messages, **params)))

    def stream_complete(self, model: str, prompt: str | Sequence[int], **params: Any
                        ) -> Iterator[Completion]:
        """``GenerateStream`` with a prompt: one chunk per delta, then a usage-only chunk."""
        return self._stream(build_request(model, prompt=prompt, **params),
                            _ChunkParser(Completion, model))

    def stream_chat(self, model: str, messages: Sequence[Message], **params: Any
                    ) -> Iterator[ChatCompletion]:
        """``GenerateStream`` with chat messages (``message`` holds each delta)."""
        return self._stream(build_request(model, messages=messages, **params),
                            _ChunkParser(ChatCompletion, model))

    def session(self) -> Session:
        """Open a ``Session`` stream (use as a context manager)."""
        return Session(self)

    def _unary(self, request: Any) -> Any:
        deadline, attempt = self._deadline(), 0
        while True:
            try:
                return self._stub.Generate(request, metadata=self.metadata,
                                           timeout=self._call_timeout(deadline, unary=True))
            except grpc.RpcError as exc:
                error = _map_rpc_error(exc)
            time.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1

    def _stream(self, request: Any, parse: _ChunkParser[T]) -> Iterator[T]:
        deadline, attempt = self._deadline(), 0
        while True:
            call = self._stub.GenerateStream(request, metadata=self.metadata,
                                             timeout=self._call_timeout(deadline, unary=False))
            try:
                first = next(call)
                break
            except StopIteration:
                return
            except grpc.RpcError as exc:
                error = _map_rpc_error(exc)
            time.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1
        try:
            yield parse(first)
            for chunk in call:
                yield parse(chunk)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op after the end; aborts the request when abandoned


class _Demux:
    """Per-request buffers of one session stream's responses."""

    def __init__(self) -> None:
        self.buffers: dict[str, deque[Any]] = {}
        self.ended = False

    def open(self, request_id: str) -> None:
        self.buffers[request_id] = deque()

    def take(self, request_id: str) -> Any:
        """The next buffered response of ``request_id`` (None: none yet); raises once ended."""
        buffer = self.buffers.get(request_id)
        if buffer:
            return buffer.popleft()
        if self.ended:
            raise APIConnectionError("the session stream ended")
        return None

    def route(self, response: Any) -> None:
        buffer = self.buffers.get(response.request_id)
        if buffer is not None:  # a request nobody waits for any more is dropped
            buffer.append(response)

    def close(self, request_id: str) -> None:
        self.buffers.pop(request_id, None)


_END = object()


class Session:
    """A bidirectional ``Session`` stream: submit many requests, read each one's chunks.

    Reading needs no background thread: whichever caller reads takes the next response off the
    stream and files it under its request, under a lock, so calls may be read from any thread
    and in any order.
    """

    def __init__(self, client: GrpcClient) -> None:
        self._client = client
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._demux = _Demux()
        self._lock = threading.Lock()
        self._call = client._stub.Session(iter(self._outbox.get, _END), metadata=client.metadata)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is still running and close the stream."""
        self._outbox.put(_END)
        self._call.cancel()

    def complete(self, model: str, prompt: str | Sequence[int], **params: Any
                 ) -> SessionCall[Completion]:
        """Start a completion on the stream; iterate the returned call for its chunks."""
        return self._submit(build_request(model, prompt=prompt, **params),
                            _ChunkParser(Completion, model))

    def chat(self, model: str, messages: Sequence[Message], **params: Any
             ) -> SessionCall[ChatCompletion]:
        """Start a chat completion on the stream."""
        return self._submit(build_request(model, messages=messages, **params),
                            _ChunkParser(ChatCompletion, model))

    def cancel(self, request_id: str) -> None:
        """Abort one request; the stream and the other requests go on."""
        self._outbox.put(pb.SessionRequest(cancel=pb.Cancel(request_id=request_id)))

    def _submit(self, request: Any, parse: _ChunkParser[T]) -> SessionCall[T]:
        request.request_id = f"r{next(self._client._ids)}"
        self._demux.open(request.request_id)
        self._outbox.put(pb.SessionRequest(generate=request))
        return SessionCall(self, request.request_id, parse)

    def _next(self, request_id: str) -> Any:
        """The next response of ``request_id``, reading the stream as needed."""
        demux = self._demux
        while True:
            with self._lock:
                found = demux.take(request_id)
                if found is not None:
                    return found
                try:
                    demux.route(next(self._call))
                except StopIteration:
                    demux.ended = True
                except grpc.RpcError as exc:
                    demux.ended = True
                    raise _map_rpc_error(exc) from None


class SessionCall(Generic[T]):
    """One request of a session: iterate for its chunks (the last is usage-only)."""

    def __init__(self, session: Session, request_id: str, parse: _ChunkParser[T]) -> None:
        self.session, self.request_id = session, request_id
        self._parse: _ChunkParser[T] = parse
        self.done = False

    def __iter__(self) -> Iterator[T]:
        while not self.done:
            response = self.session._next(self.request_id)
            if response.final:
                self.done = True
                self.session._demux.close(self.request_id)
            if response.WhichOneof("kind") == "error":
                raise error_from_status(response.error)
            yield self._parse(response.chunk)

    def cancel(self) -> None:
        """Abort this request (its remaining chunks end with finish_reason ``abort``)."""
        self.session.cancel(self.request_id)

    def result(self) -> T:
        """Read the rest and return the whole response."""
        return _collect(self._parse.cls, list(self))


# -- async ---------------------------------------------------------------------------------

class AsyncGrpcClient(_Base, AsyncChatMethods):
    """The asyncio twin of :class:`GrpcClient` (grpc.aio)."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, *,
                 timeout: Timeout = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None,
                 credentials: Any = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, api_key, timeout, retry, credentials, options)
        self._channel: Any = None
        self._stub_: Any = None

    @property
    def _stub(self) -> Any:
        if self._stub_ is None:  # made on first use, inside the running event loop
            self._channel = (
                grpc.aio.secure_channel(self.target, self.credentials, self.options)
                if self.credentials else grpc.aio.insecure_channel(self.target, self.options))
            self._stub_ = pb_grpc.GenerationStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub_

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_ = None

    async def complete(self, model: str, prompt: str | Sequence[int], **params: Any) -> Completion:
        """``Generate`` with a prompt (text or token ids)."""
        return _completion(await self._unary(build_request(model, prompt=prompt, **params)))

    async def chat(self, model: str, messages: Sequence[Message], **params: Any) -> ChatCompletion:
        """``Generate`` with chat messages."""
        return _chat(await self._unary(build_request(model, messages=messages, **params)))

    def stream_complete(self, model: str, prompt: str | Sequence[int], **params: Any
                        ) -> AsyncIterator[Completion]:
        """``GenerateStream`` with a prompt: one chunk per delta, then a usage-only chunk."""
        return self._stream(build_request(model, prompt=prompt, **params),
                            _ChunkParser(Completion, model))

    def stream_chat(self, model: str, messages: Sequence[Message], **params: Any
                    ) -> AsyncIterator[ChatCompletion]:
        """``GenerateStream`` with chat messages."""
        return self._stream(build_request(model, messages=messages, **params),
                            _ChunkParser(ChatCompletion, model))

    def session(self) -> AsyncSession:
        """Open a ``Session`` stream (use as an async context manager)."""
        return AsyncSession(self)

    async def _unary(self, request: Any) -> Any:
        deadline, attempt = self._deadline(), 0
        while True:
            try:
                return await self._stub.Generate(
                    request, metadata=self.metadata,
                    timeout=self._call_timeout(deadline, unary=True))
            except grpc.aio.AioRpcError as exc:
                error = _map_rpc_error(exc)
            await asyncio.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1

    async def _stream(self, request: Any, parse: _ChunkParser[T]) -> AsyncIterator[T]:
        deadline, attempt = self._deadline(), 0
        while True:
            call = self._stub.GenerateStream(request, metadata=self.metadata,
                                             timeout=self._call_timeout(deadline, unary=False))
            try:
                first = await call.read()
                break
            except grpc.aio.AioRpcError as exc:
                error = _map_rpc_error(exc)
            await asyncio.sleep(self._retry_delay(attempt, error, deadline))
            attempt += 1
        try:
            message = first
            while message is not grpc.aio.EOF:
                yield parse(message)
                message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _map_rpc_error(exc) from None
        finally:
            call.cancel()


class AsyncSession:
    """The asyncio twin of :class:`Session`."""

    def __init__(self, client: AsyncGrpcClient) -> None:
        self._client = client
        self._demux = _Demux()
        self._lock = asyncio.Lock()
        self._call = client._stub.Session(metadata=client.metadata)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel what is still running and close the stream."""
        self._call.cancel()

    async def done_writing(self) -> None:
        """No more requests: the server ends the stream once the open ones finish."""
        await self._call.done_writing()

    async def complete(self, model: str, prompt: str | Sequence[int], **params: Any
                       ) -> AsyncSessionCall[Completion]:
        """Start a completion on the stream; iterate the returned call for its chunks."""
        return await self._submit(build_request(model, prompt=prompt, **params),
                                  _ChunkParser(Completion, model))

    async def chat(self, model: str, messages: Sequence[Message], **params: Any
                   ) -> AsyncSessionCall[ChatCompletion]:
        """Start a chat completion on the stream."""
        return await self._submit(build_request(model, messages=messages, **params),
                                  _ChunkParser(ChatCompletion, model))

    async def cancel(self, request_id: str) -> None:
        """Abort one request; the stream and the other requests go on."""
        await self._write(pb.SessionRequest(cancel=pb.Cancel(request_id=request_id)))

    async def _write(self, message: Any) -> None:
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise _map_rpc_error(exc) from None

    async def _submit(self, request: Any, parse: _ChunkParser[T]) -> AsyncSessionCall[T]:
        request.request_id = f"r{next(self._client._ids)}"
        self._demux.open(request.request_id)
        await self._write(pb.SessionRequest(generate=request))
        return AsyncSessionCall(self, request.request_id, parse)

    async def _next(self, request_id: str) -> Any:
        demux = self._demux
        while True:
            async with self._lock:
                found = demux.take(request_id)
                if found is not None:
                    return found
                try:
                    message = await self._call.read()
                except grpc.aio.AioRpcError as exc:
                    demux.ended = True
                    raise _map_rpc_error(exc) from None
                if message is grpc.aio.EOF:
                    demux.ended = True
                else:
                    demux.route(message)


class AsyncSessionCall(Generic[T]):
    """One request of an async session: ``async for`` its chunks (the last is usage-only)."""

    def __init__(self, session: AsyncSession, request_id: str, parse: _ChunkParser[T]) -> None:
        self.session, self.request_id = session, request_id
        self._parse: _ChunkParser[T] = parse
        self.done = False

    async def __aiter__(self) -> AsyncIterator[T]:
        while not self.done:
            response = await self.session._next(self.request_id)
            if response.final:
                self.done = True
                self.session._demux.close(self.request_id)
            if response.WhichOneof("kind") == "error":
                raise error_from_status(response.error)
            yield self._parse(response.chunk)

    async def cancel(self) -> None:
        """Abort this request (its remaining chunks end with finish_reason ``abort``)."""
        await self.session.cancel(self.request_id)

    async def result(self) -> T:
        """Read the rest and return the whole response."""
        return _collect(self._parse.cls, [chunk async for chunk in self])
