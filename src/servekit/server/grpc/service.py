"""The gRPC servicer: ``Generate``, ``GenerateStream`` and ``Session`` on a GenerationService.

Everything between the wire and the engine is the shared :class:`GenerationService` (keys,
model check, tokenization, rate-limit reservation and settlement, one engine request per
choice, abort on exit), so a gRPC request is admitted, limited, counted and cleaned up exactly
as an HTTP one. A call the client cancels is cancelled here too: its engine requests are
aborted (their KV blocks freed) and its reservation settled with the real usage.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio

from servekit._optional import require
from servekit.engine.outputs import RequestOutput
from servekit.limit.keys import ApiKey
from servekit.protocol.errors import InvalidRequestError, StatusError
from servekit.server.grpc.convert import ChunkEncoder, ResponseBuilder, build_job, check_output
from servekit.server.grpc.outbox import Outbox
from servekit.server.grpc.status import grpc_code, to_status, trailing_metadata
from servekit.server.service import GenerationService, Job
from servekit.server.tools import ToolPlan

grpc = require("grpc", "grpc")
from google.protobuf.message import DecodeError  # noqa: E402

from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["GenerationServicer", "add_generation_servicer", "as_api_error"]

logger = logging.getLogger("servekit.server.grpc")

def as_api_error(exc: Exception) -> StatusError:
    """``exc`` as an API error: itself, or a logged 500 for anything unexpected."""
    if isinstance(exc, StatusError):
        return exc
    logger.exception("gRPC request failed", exc_info=exc)
    return StatusError(f"internal error: {type(exc).__name__}")


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def _abort(context: Any, exc: StatusError) -> None:
    """End the call with the error's status, details and headers (raises)."""
    await context.abort(_STATUS_CODES[grpc_code(exc)], exc.message, trailing_metadata(exc))


def _metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(headers.items())


class _Undecodable:
    """A request whose bytes did not parse (a string that is not UTF-8, a corrupt message)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(message_type: Any) -> Any:
    """A deserializer that hands a parse failure to the handler (grpc would answer INTERNAL)."""
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidRequestError(f"the request could not be parsed: {request.error}")


def add_generation_servicer(servicer: GenerationServicer, server: Any) -> None:
    """Register ``servicer`` on a grpc.aio ``server``: an unparsable request (bad UTF-8 in a
    string) is INVALID_ARGUMENT, where the generated ``add_...ToServer`` would say INTERNAL."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString),
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session, request_deserializer=_lenient(pb.SessionRequest),
            response_serializer=pb.SessionResponse.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class GenerationServicer(pb_grpc.GenerationServicer):  # type: ignore[misc]
    """``servekit.v1.Generation`` on a :class:`GenerationService` (add it to a grpc.aio server)."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service

    def _caller(self, context: Any) -> ApiKey | None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
                break
        return self.service.authenticate(authorization)

    async def _admit(self, request: Any, context: Any
                     ) -> tuple[Job, ToolPlan, dict[str, str]]:
        _check_decoded(request)
        job, plan = await build_job(self.service, request, self._caller(context))
        return job, plan, (await self.service.admit(job)).headers

    async def Generate(self, request: Any, context: Any) -> Any:
        """Unary: the whole response."""
        try:
            job, plan, headers = await self._admit(request, context)
            try:
                if headers:  # the call may end here (the client gone): settled below
                    await context.send_initial_metadata(_metadata(headers))
                builder = ResponseBuilder(job, plan)
                await self.service.run(job, builder.add)
            finally:
                await self.service.release(job)  # run settled it, unless it never ran
            return builder.response()
        except Exception as exc:
            await _abort(context, as_api_error(exc))

    async def GenerateStream(self, request: Any, context: Any) -> None:
        """Server streaming: the deltas as chunks, then the final chunk with the usage."""
        try:
            job, plan, headers = await self._admit(request, context)
        except Exception as exc:
            await _abort(context, as_api_error(exc))
        try:
            await self._stream(job, plan, headers, context)
        finally:
            await self.service.release(job)  # run settled it, unless it never ran

    async def _stream(self, job: Job, plan: ToolPlan, headers: dict[str, str],
                      context: Any) -> None:
        if headers:  # the call may end here (the client gone)
            await context.send_initial_metadata(_metadata(headers))
        encoder = ChunkEncoder(job, plan)
        chunk, outbox = encoder.chunk, Outbox()

        encoders = [functools.partial(chunk, i) for i in range(len(job.choices))]

        async def on_output(i: int, out: RequestOutput) -> None:
            if out.finish_reason == "error":  # raised here, not in the writer
                check_output(out)
            await outbox.put_delta(i, out, encoders[i])

        error: StatusError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(outbox.drain, context.write)
            try:
                await self.service.run(job, on_output)
                for msg in encoder.aborted():
                    await outbox.put(msg)
                await outbox.put(encoder.final())
            except Exception as exc:
                error = as_api_error(exc)
            finally:
                outbox.close()  # what was generated is still written, then the status
        if error is not None:
            await _abort(context, error)

    async def Session(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        """Bidirectional: many requests on one stream, each answered under its request id."""
        try:
            key = self._caller(context)
        except Exception as exc:
            await _abort(context, as_api_error(exc))
        outbox = Outbox()
        scopes: dict[str, anyio.CancelScope] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(outbox.drain, context.write)
            try:
                async with anyio.create_task_group() as requests:
                    async for message in request_iterator:
                        if isinstance(message, _Undecodable):
                            await outbox.put(_error_response("", InvalidRequestError(
                                f"the request could not be parsed: {message.error}")))
                            continue
                        kind = message.WhichOneof("kind")
                        if kind == "generate":
                            rid = message.generate.request_id
                            if not rid or rid in scopes:
                                why = "is required" if not rid else f"{rid!r} is already open"
                                await outbox.put(_error_response(rid, InvalidRequestError(
                                    f"request_id {why} on this session", param="request_id")))
                                continue
                            scope = scopes[rid] = anyio.CancelScope()
                            requests.start_soon(self._session_request, key, message.generate,
                                                outbox, scope, scopes)
                        elif kind == "cancel":
                            open_scope = scopes.get(message.cancel.request_id)
                            if open_scope is not None:
                                open_scope.cancel()
            finally:
                outbox.close()

    async def _session_request(self, key: ApiKey | None, request: Any, outbox: Outbox,
                               scope: anyio.CancelScope,
                               scopes: dict[str, anyio.CancelScope]) -> None:
        rid = request.request_id
        error: StatusError | None = None
        encoder: ChunkEncoder | None = None
        try:
            with scope:  # a Cancel message cancels it: the job is aborted and settled
                try:
                    job, plan = await build_job(self.service, request, key)
                    await self.service.admit(job)
                    encoder = ChunkEncoder(job, plan)
                    chunk = encoder.chunk

                    def encode(i: int, out: RequestOutput) -> Any:
                        return pb.SessionResponse(request_id=rid, chunk=chunk(i, out))

                    encoders = [functools.partial(encode, i) for i in range(len(job.choices))]

                    async def on_output(i: int, out: RequestOutput) -> None:
                        if out.finish_reason == "error":  # raised here, not in the writer
                            check_output(out)
                        # queued before any checkpoint: a counted delta is never lost to a Cancel
                        await outbox.put_delta((rid, i), out, encoders[i])

                    await self.service.run(job, on_output)
                except Exception as exc:
                    error = as_api_error(exc)
        finally:
            scopes.pop(rid, None)
        if error is not None or encoder is None:
            await outbox.put(_error_response(rid, error or StatusError("request cancelled")))
            return
        for msg in encoder.aborted():
            await outbox.put(pb.SessionResponse(request_id=rid, chunk=msg))
        await outbox.put(pb.SessionResponse(request_id=rid, final=True, chunk=encoder.final()))


def _error_response(request_id: str, exc: StatusError) -> Any:
    return pb.SessionResponse(request_id=request_id, final=True, error=to_status(exc))
