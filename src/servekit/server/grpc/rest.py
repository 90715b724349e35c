"""The REST mapping of ``servekit.v1.Generation``: its ``google.api.http`` routes for the HTTP app.

The routes are read from the annotations in ``servekit.proto`` (``POST /v1/generate`` ->
``Generate``, ``POST /v1/generate:stream`` -> ``GenerateStream``) and bodies use the proto3
JSON mapping (``google.protobuf.json_format``: lowerCamelCase out, either spelling in, unknown
fields rejected). A stream is newline-delimited JSON, one ``GenerateChunk`` per line. Errors are
the ``google.rpc.Status`` JSON (``{"code", "message", "details"}``) with the HTTP status of its
code and the same ``retry-after`` / ``x-ratelimit-*`` headers as the rest of the API; an error
after a stream has started is one last line ``{"error": <Status>}``.

    app.include_router(rest_router(app.state.servekit))
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from servekit._optional import require
from servekit.engine.outputs import RequestOutput
from servekit.errors import ServekitError
from servekit.protocol.errors import InvalidRequestError, StatusError
from servekit.server.disconnect import cancel_on_disconnect
from servekit.server.grpc.convert import ChunkEncoder, ResponseBuilder, build_job
from servekit.server.grpc.service import as_api_error
from servekit.server.grpc.status import http_status, metadata_headers, to_status
from servekit.server.service import GenerationService, Job
from servekit.server.tools import NO_TOOLS, ToolPlan

require("fastapi", "server")
require("google.protobuf", "grpc")
from fastapi import APIRouter, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from google.api import annotations_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402

__all__ = ["NDJSON", "rest_router", "routes"]

NDJSON = "application/x-ndjson"
_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]
# where json_format says the problem is: 'no field named "x" at "GenerateRequest.a.b[0]"' or
# '... at GenerateRequest.a.b'
_UNKNOWN = re.compile(r'no field named "(\w+)" at "GenerateRequest\.?([\w.\[\]]*)"')
_AT = re.compile(r' at GenerateRequest\.([\w.\[\]]+)')
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
_NO_KEY = object()

Endpoint = Callable[[Request], Awaitable[Response]]


class UnsupportedHttpRuleError(ServekitError, ValueError):
    """A ``google.api.http`` rule in the .proto has a shape the REST mapping does not serve."""


def routes() -> list[tuple[str, str, str]]:
    """``(http method, path, rpc name)`` of every annotated method of the service."""
    out = []
    for method in _SERVICE.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb not in ("get", "put", "post", "delete", "patch") or rule.body != "*":
            raise UnsupportedHttpRuleError(
                f"{method.full_name}: only get/put/post/delete/patch rules with `body: \"*\"` "
                "are mapped to REST; change the rule in servekit.proto")
        out.append((verb.upper(), getattr(rule, verb), method.name))
    return out


def rest_router(service: GenerationService) -> APIRouter:
    """A FastAPI router serving the service's ``google.api.http`` routes on ``service``."""
    handlers: dict[str, Callable[[GenerationService], Endpoint]] = {
        "Generate": _unary, "GenerateStream": _streaming}
    router = APIRouter(tags=["grpc-rest"])
    for verb, path, name in routes():
        router.add_api_route(path, handlers[name](service), methods=[verb],
                             name=f"{_SERVICE.full_name}.{name}",
                             summary=f"{name} (REST mapping of {_SERVICE.full_name})")
    return router


def parse_error_field(message: str) -> str | None:
    """The field (proto name, ``chat.messages[0].role``) a json_format error is about."""
    unknown = _UNKNOWN.search(message)
    if unknown:
        path = ".".join(p for p in (unknown.group(2), unknown.group(1)) if p)
    else:
        at = _AT.search(message)
        if at is None:
            return None
        path = at.group(1)
    return _CAMEL.sub(lambda m: "_" + m.group(1).lower(), path)


async def _prepare(service: GenerationService, request: Request, body: bytes
                   ) -> tuple[Job, ToolPlan, dict[str, str]]:
    # inside the HTTP app, its middleware has authenticated /v1/* already
    key = request.scope.get("servekit.key", _NO_KEY)
    if key is _NO_KEY:
        key = service.authenticate(request.headers.get("authorization"))
    message = pb.GenerateRequest()
    try:
        json_format.Parse((body or b"{}").decode(), message)
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not UTF-8 text: {exc.reason} at byte "
                              f"{exc.start}") from None
    except json_format.ParseError as exc:
        text = str(exc).split("\n")[0]
        raise InvalidRequestError(f"invalid request body: {text}",
                              param=parse_error_field(text)) from exc
    job, plan = await build_job(service, message, key)
    return job, plan, (await service.admit(job)).headers


def _json(message: Any) -> bytes:
    text: str = json_format.MessageToJson(message, indent=None)
    return text.encode()


def error_response(exc: StatusError) -> Response:
    """The ``google.rpc.Status`` JSON of an error, with its HTTP status and headers."""
    status = to_status(exc)
    return Response(_json(status), status_code=http_status(status.code),
                    headers=metadata_headers(exc), media_type="application/json")


def _unary(service: GenerationService) -> Endpoint:
    async def generate(request: Request) -> Response:
        try:
            job, plan, headers = await _prepare(service, request, await request.body())
            builder = ResponseBuilder(job, plan)
            await service.run(job, builder.add)
        except Exception as exc:
            return error_response(as_api_error(exc))
        return Response(_json(builder.response()), headers=headers, media_type="application/json")

    return generate


def _streaming(service: GenerationService) -> Endpoint:
    async def generate_stream(request: Request) -> Response:
        try:
            job, plan, headers = await _prepare(service, request, await request.body())
        except Exception as exc:
            return error_response(as_api_error(exc))
        return ChunkStream(service, job, headers, plan)

    return generate_stream


class ChunkStream(Response):
    """Runs a job while the client is connected, one ``GenerateChunk`` JSON line per delta.

    The status line waits for the first delta, so an error before it still gets its status;
    a client disconnect cancels the job (engine requests aborted, reservation settled).
    """

    def __init__(self, service: GenerationService, job: Job, headers: dict[str, str],
                 plan: ToolPlan = NO_TOOLS) -> None:
        self.service, self.job, self.extra_headers, self.plan = service, job, headers, plan
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            await self._stream(scope, send)
            tg.cancel_scope.cancel()

    async def _start(self, send: Any) -> None:
        headers = [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-cache"),
                   *((k.encode(), v.encode()) for k, v in self.extra_headers.items())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _stream(self, scope: Any, send: Any) -> None:
        encoder = ChunkEncoder(self.job, self.plan)
        started = False

        async def line(message: Any) -> None:
            nonlocal started
            if not started:
                started = True
                await self._start(send)
            await send({"type": "http.response.body", "body": _json(message) + b"\n",
                        "more_body": True})

        async def on_output(i: int, out: RequestOutput) -> None:
            await line(encoder.chunk(i, out))

        try:
            await self.service.run(self.job, on_output)
            for message in (*encoder.aborted(), encoder.final()):
                await line(message)
        except Exception as exc:
            err = as_api_error(exc)
            if not started:
                await error_response(err)(scope, _no_receive, send)
                return
            status = json_format.MessageToDict(to_status(err))
            await send({"type": "http.response.body", "more_body": True,
                        "body": json.dumps({"error": status}).encode() + b"\n"})
        await send({"type": "http.response.body", "body": b""})


async def _no_receive() -> Any:  # pragma: no cover - a plain Response never receives
    raise RuntimeError("unexpected receive")
