"""The OpenAI-compatible HTTP app: routes, error mapping, streaming, lifespan.

``create_app(engine)`` returns a FastAPI (ASGI) app serving ``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/ready`` and ``/metrics``. Pass an
engine (or a zero-argument factory that builds one, run in a worker thread at startup so the
server answers ``/health`` while the model loads), and optionally keys, limits and hooks.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from attrs import frozen

from servekit import __version__
from servekit._optional import require
from servekit.engine.outputs import RequestOutput
from servekit.limit.keyed import KeyLimits
from servekit.limit.keys import ApiKey, KeyStore
from servekit.metrics.events import (
    KV_BLOCKS_IN_USE,
    OPEN_STREAMS,
    RATE_LIMIT_RESERVATIONS,
    RATE_LIMIT_STORE_ERRORS,
)
from servekit.metrics.hooks import HookSet
from servekit.protocol.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    StatusError,
    error_body,
)
from servekit.protocol.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ResumeExtension,
    bad_request_from_validation,
)
from servekit.protocol.sse import DONE, error_event
from servekit.sched.params import SamplingParams
from servekit.server.disconnect import cancel_on_disconnect
from servekit.server.lifecycle import Phase, ServerState
from servekit.server.openapi import openapi_document
from servekit.server.params import build_sampling_params, check_unsupported
from servekit.server.responses import ChatEncoder, CompletionEncoder, Encoder, ToolChatEncoder
from servekit.server.service import EngineLike, GenerationService, Job
from servekit.server.tools import NO_TOOLS, chat_messages, compile_guided, plan_tools
from servekit.server.usage_path import track

if TYPE_CHECKING:
    from servekit.usage.recorder import UsageRecorder

require("fastapi", "server")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from servekit.protocol.replica import (  # noqa: E402
    ATTEMPT_HEADER,
    EXTENSIONS_HEADER,
    PRIVATE_HEADER_PREFIX,
    USAGE,
)
from servekit.server.replica_api import (  # noqa: E402
    gateway_identity,
    mount_replica_api,
    token_ids_comment,
    trusted,
    usage_comment,
)

__all__ = ["ServerConfig", "create_app"]

logger = logging.getLogger("servekit.server")

_PRIVATE_PREFIX = PRIVATE_HEADER_PREFIX.encode()

#: Scope key of the server's own ``send``, set outside the middleware stack (see _raw_send).
_RAW_SEND = "servekit.raw_send"


@frozen(slots=True, kw_only=True)
class ServerConfig:
    """Server settings: served model names (default: the engine's), drain grace period, etc."""

    model_names: tuple[str, ...] = ()
    grace_period: float = 30.0
    retry_after: float = 1.0
    manage_engine: bool = True  # enter/exit the engine's async context in the app's lifespan
    #: Largest request body, bytes (413 above); None: derived from the model (docs/server.md).
    max_body_bytes: int | None = None
    #: Seconds a stream may wait on a client that stopped reading before it is aborted.
    send_timeout: float = 30.0
    #: With the rate-limit store down: admit unlimited (True) or answer 503 (False, the default).
    rate_limit_fail_open: bool = False
    #: ``retry-after`` seconds of the 503 sent while the rate-limit store is down.
    rate_limit_outage_retry_after: float = 10.0
    #: Names of the default /metrics: "prometheus" (``servekit_``) or "vllm" (``vllm:``).
    metrics_style: str = "prometheus"
    #: The secret a trusted gateway sends (servekit.server.replica_api); None: endpoints off.
    gateway_secret: str | None = None
    #: Once the engine is ready, hide what start-up built from the garbage collector
    #: (``gc.freeze``); for a process that is only this server (``servekit serve`` sets it).
    freeze_startup_heap: bool = False


def create_app(
    engine: EngineLike | Callable[[], EngineLike],
    *,
    keys: KeyStore | None = None,
    limits: KeyLimits | None = None,
    hooks: HookSet | None = None,
    metrics: Any = None,
    config: ServerConfig | None = None,
    usage: UsageRecorder | None = None,
) -> FastAPI:
    """Assemble the app. ``metrics`` is a :class:`servekit.metrics.prometheus.PrometheusHook`
    (one is made when prometheus_client is installed and none is given; ``False`` for none).
    ``usage`` records a usage record per finished generation request (docs/usage.md)."""
    config = config or ServerConfig()
    keys = keys if keys is not None else KeyStore()
    hooks = hooks if hooks is not None else HookSet()
    if metrics is None:
        metrics = _default_metrics(config, engine)
    if metrics and metrics not in hooks.hooks:
        hooks.add(metrics)
    state = ServerState(retry_after=config.retry_after)
    if limits is None:
        limits = KeyLimits(hooks=hooks, fail_open=config.rate_limit_fail_open,
                           outage_retry_after=config.rate_limit_outage_retry_after)
    built = engine if _is_engine(engine) else None
    service = GenerationService(built, keys=keys, limits=limits, state=state, hooks=hooks,  # type: ignore[arg-type]
                                model_names=config.model_names,
                                max_body_bytes=config.max_body_bytes)
    if keys.open:
        logger.warning("no API keys configured: the server is OPEN to anyone who can reach it")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_engine, service, engine, config, stop)
            if usage is not None:
                usage.start()
            try:
                yield
            finally:
                await state.drain(config.grace_period)
                stop.set()
                if usage is not None:
                    await anyio.to_thread.run_sync(usage.stop)

    app = FastAPI(title="servekit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API served by servekit")
    _raw_send(app)
    app.state.servekit = service
    try:
        from servekit.server.grpc.rest import rest_router
    except ImportError:  # servekit[grpc] not installed: no REST mapping of the gRPC API
        pass
    else:
        app.include_router(rest_router(service))
    _install_error_handlers(app)
    mount_replica_api(app, service, hooks, config.gateway_secret)

    def openapi() -> dict[str, Any]:
        """The document for the served model (bounds read from the engine once it is ready)."""
        if app.openapi_schema is None or app.state.openapi_engine is not service.engine:
            app.openapi_schema = None
            app.openapi_schema = openapi_document(FastAPI.openapi(app), service)
            app.state.openapi_engine = service.engine
        return app.openapi_schema

    app.state.openapi_engine = None
    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(_BodyLimitMiddleware, service=service)  # type: ignore[arg-type]
    app.add_middleware(_AuthMiddleware, service=service,  # type: ignore[arg-type]  # outermost
                       gateway_secret=config.gateway_secret)

    def caller(request: Request) -> ApiKey | None:
        return request.scope.get("servekit.key")  # set by _AuthMiddleware

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion (OpenAI ``/v1/completions``), streamed as SSE when ``stream``."""
        key = caller(request)
        check_unsupported(body)
        service.check_model(body.model)
        prompts = await service.encode_prompts(body.prompt)
        choices = []
        for p, ids in enumerate(prompts):
            max_tokens = service.resolve_max_tokens(body.max_tokens, len(ids), "max_tokens")
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                choices.append((p, build_sampling_params(body, max_tokens=max_tokens,
                                                         logprobs=body.logprobs, seed=seed)))
        await compile_guided(service.engine, choices[0][1].guided if choices else None)
        job = _job(service, request, body, "cmpl", key, prompts, choices)
        echo = None
        if body.echo:
            tok = service.engine.tokenizer  # type: ignore[union-attr]
            skip = body.skip_special_tokens is not False
            echo = [tok.decode(ids, skip_special_tokens=skip) for ids in prompts]
        encoder = CompletionEncoder(job, service.engine.tokenizer,  # type: ignore[union-attr]
                                    include_usage=_include_usage(body), echo=echo,
                                    logprobs=body.logprobs is not None)
        return await _generation_response(service, job, encoder, body.stream, config, usage,
                                          *_gateway_call(request, body))

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (OpenAI ``/v1/chat/completions``), streamed as SSE when ``stream``."""
        key = caller(request)
        check_unsupported(body)
        service.check_model(body.model)
        plan = NO_TOOLS
        if body.tools or body.tool_choice is not None:
            plan = await plan_tools(body, service.chat_template())
        ids = await service.encode_chat(chat_messages(body), plan.prompt_tools)
        tokenizer = service.engine.tokenizer  # type: ignore[union-attr]
        requested, param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            requested, param = body.max_completion_tokens, "max_completion_tokens"
        max_tokens = service.resolve_max_tokens(requested, len(ids), param)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices = [(0, build_sampling_params(
            body, max_tokens=max_tokens, logprobs=logprobs, guided=plan.guided,
            keep_special_tokens=plan.keep_special_tokens,
            seed=None if body.seed is None else body.seed + j)) for j in range(body.n)]
        await compile_guided(service.engine, choices[0][1].guided,
                             "tools" if plan.guided is not None else None)
        job = _job(service, request, body, "chatcmpl", key, [ids], choices)
        encoder: Encoder
        if plan.parser is not None:
            encoder = ToolChatEncoder(job, tokenizer, parser=plan.parser, parallel=plan.parallel,
                                      include_usage=_include_usage(body), logprobs=body.logprobs)
        else:
            encoder = ChatEncoder(job, tokenizer, include_usage=_include_usage(body),
                                  logprobs=body.logprobs)
        return await _generation_response(service, job, encoder, body.stream, config, usage,
                                          *_gateway_call(request, body))

    def _trusted(request: Request) -> bool:
        return trusted(request, config.gateway_secret)

    def _gateway_call(request: Request, body: CompletionRequest | ChatCompletionRequest
                      ) -> tuple[frozenset[str], str | None]:
        """For a trusted gateway's attempt: the stream extensions it asked for (each chunk's
        output token ids, to resume elsewhere; the attempt's usage before ``[DONE]``) and,
        when the gateway records usage itself, its attempt key (the gateway writes the ledger
        record: ours is analytics only). Otherwise no extensions and None."""
        if config.gateway_secret is None or not _trusted(request):
            return frozenset(), None
        attempt = request.headers.get(ATTEMPT_HEADER)
        attempt = attempt[:300] if attempt is not None else None
        if not body.stream:
            return frozenset(), attempt
        asked = request.headers.get(EXTENSIONS_HEADER, "").split(",")
        return frozenset(e for e in ("token_ids", USAGE) if e in asked), attempt

    def _job(service: GenerationService, request: Request,
             body: CompletionRequest | ChatCompletionRequest, kind: str, key: ApiKey | None,
             prompts: list[list[int]], choices: list[tuple[int, SamplingParams]]) -> Job:
        """The job of a request; a gateway's ``servekit_resume`` continues a cut stream."""
        resume = body.servekit_resume
        if resume is None:
            return Job(service.new_request_id(kind), body.model, key, prompts, choices)
        if not _trusted(request):
            raise InvalidRequestError("servekit_resume is accepted only from a trusted gateway",
                                      param="servekit_resume")
        per_choice = _resumed_choices(resume, len(choices))
        vocab = len(service.engine.tokenizer)  # type: ignore[union-attr]
        for i, (outputs, finished) in enumerate(per_choice):
            param = ("servekit_resume.output_token_ids" if resume.choices is None
                     else f"servekit_resume.choices[{i}].output_token_ids")
            if any(t >= vocab for t in outputs):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})", param=param)
            if finished is None and len(outputs) >= choices[i][1].max_tokens:
                raise InvalidRequestError(
                    f"{len(outputs)} resumed tokens leave no room under max_tokens "
                    f"{choices[i][1].max_tokens}", param=param)
        job = Job(resume.request_id or service.new_request_id(kind), body.model, key, prompts,
                  choices, resume=[list(o) for o, _ in per_choice],
                  resume_finished=[f for _, f in per_choice])
        if resume.created is not None:
            job.created = resume.created
        return job

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """The models this server serves."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "servekit",
             "max_model_len": service.engine.max_model_len if service.engine else None}
            for name in service.model_names]}

    @app.get("/health", tags=["ops"])
    async def health() -> Response:
        """Liveness: 200 unless startup failed."""
        if state.phase is Phase.FAILED:
            return JSONResponse({"status": "failed", "error": state.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", tags=["ops"])
    async def ready() -> Response:
        """Readiness: 200 when accepting requests; 503 while starting or draining."""
        return JSONResponse({"ready": state.ready, "phase": state.phase.value,
                             "in_flight": state.in_flight},
                            status_code=200 if state.ready else 503)

    if metrics:
        @app.get("/metrics", tags=["ops"], include_in_schema=True)
        async def prometheus() -> Response:
            """Prometheus metrics (vLLM's vocabulary), with the leak gauges refreshed now."""
            metrics.set_resource(OPEN_STREAMS, state.in_flight)
            metrics.set_resource(RATE_LIMIT_RESERVATIONS, limits.open_reservations)
            metrics.set_resource(RATE_LIMIT_STORE_ERRORS, limits.store_errors)
            used = _used_blocks(service.engine)
            if used is not None:
                metrics.set_resource(KV_BLOCKS_IN_USE, used)
            return Response(metrics.render(),
                            media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _resumed_choices(resume: ResumeExtension, n: int) -> list[tuple[list[int], str | None]]:
    """Per choice of a ``servekit_resume``: the output ids already sent and the finish reason
    of a choice that had finished; a 400 naming the field when it does not fit ``n``
    choices."""
    if (resume.output_token_ids is None) == (resume.choices is None):
        raise InvalidRequestError("servekit_resume needs output_token_ids (one choice) or "
                                  "choices (several), not both", param="servekit_resume")
    if resume.choices is None:
        assert resume.output_token_ids is not None
        if n != 1:
            raise InvalidRequestError("servekit_resume.output_token_ids continues one choice; "
                                      "several need choices", param="servekit_resume")
        return [(list(resume.output_token_ids), None)]
    if len(resume.choices) != n:
        raise InvalidRequestError(f"servekit_resume.choices must have one entry per choice "
                                  f"({n})", param="servekit_resume.choices")
    return [(list(c.output_token_ids), c.finish_reason) for c in resume.choices]


class _AuthMiddleware:
    """Authenticates ``/v1/*`` before anything else (even before the body is parsed). A
    request from the trusted gateway carries the caller it authenticated instead."""

    def __init__(self, app: Any, service: GenerationService,
                 gateway_secret: str | None = None) -> None:
        self.app, self.service, self.gateway_secret = app, service, gateway_secret

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _route_path(scope).startswith("/v1/"):
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            if self.gateway_secret is not None:
                headers = {k.decode("latin-1"): v.decode("latin-1")
                           for k, v in scope["headers"] if k.startswith(_PRIVATE_PREFIX)}
                caller = gateway_identity(headers, self.gateway_secret)
                if caller is not None:
                    scope["servekit.key"] = caller
                    await self.app(scope, receive, send)
                    return
            try:
                scope["servekit.key"] = self.service.authenticate(authorization)
            except StatusError as exc:
                await _send_error(send, exc)
                return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """Reads request bodies up to the service's limit; a larger one is a 413, unread."""

    def __init__(self, app: Any, service: GenerationService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.service.body_limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _send_error(send, _too_large(limit))
                    return
                break
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, _too_large(limit))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


#: Middlewares that hand ``send`` down unchanged: with only these installed, a stream may
#: skip the wrappers starlette puts around ``send`` once its response has started.
_PASS_THROUGH: frozenset[Any] = frozenset((_AuthMiddleware, _BodyLimitMiddleware))


def _too_large(limit: int) -> StatusError:
    return PayloadTooLargeError(f"The request body is larger than {limit} bytes, the limit of "
                                "this server", limit=limit)


async def _send_error(send: Any, exc: StatusError) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": exc.body()})


def _route_path(scope: Any) -> str:
    """The path the router matches: ``path`` less ``root_path`` (uvicorn sends both joined)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


# -- engine lifecycle ----------------------------------------------------------------------

def _is_engine(obj: Any) -> bool:
    return hasattr(obj, "generate") and hasattr(obj, "abort")


async def _run_engine(service: GenerationService, engine: Any, config: ServerConfig,
                      stop: anyio.Event) -> None:
    state = service.state
    try:
        if not _is_engine(engine):
            engine = await anyio.to_thread.run_sync(engine)
            service.engine = engine
        if config.manage_engine and hasattr(engine, "__aenter__"):
            async with engine:  # entered first: an engine core in another process says its
                await anyio.to_thread.run_sync(service.prepare)  # bounds once started
                _ready(state, config)
                logger.info("ready: serving %s", ", ".join(service.model_names))
                await _serve_until(stop, engine, state)
        else:
            await anyio.to_thread.run_sync(service.prepare)
            _ready(state, config)
            await _serve_until(stop, engine, state)
    except Exception as exc:
        logger.exception("the engine failed")
        state.set_failed(f"{type(exc).__name__}: {exc}")


def _ready(state: ServerState, config: ServerConfig) -> None:
    if config.freeze_startup_heap:
        # what start-up built (the model, the tokenizer, the libraries) leaves the collector's
        # sight: a full collection then walks only what serving allocates (as vLLM's engine
        # core does); without it, rounds of 1,000 ready deltas per pass averaged 2x the CPU
        gc.collect()
        gc.freeze()
    state.set_ready()


async def _serve_until(stop: anyio.Event, engine: Any, state: ServerState) -> None:
    """Wait for ``stop``; an engine that can die on its own (an engine core in another process,
    ``wait_failed``) turns the server to failed when it does: ``/ready`` and new requests 503."""
    wait_failed = getattr(engine, "wait_failed", None)
    if wait_failed is None:
        await stop.wait()
        return

    async def watch() -> None:
        error = await wait_failed()
        logger.error("the engine failed: %s", error)
        state.set_failed(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await stop.wait()
        tg.cancel_scope.cancel()


def _used_blocks(engine: Any) -> int | None:
    """KV blocks held by live requests: the fake's counter, or the real engine's KV manager."""
    value = getattr(engine, "num_used_blocks", None)
    if value is not None:
        return int(value)
    kv = getattr(getattr(engine, "engine", None), "kv", None)  # AsyncEngine -> LLMEngine.kv
    if kv is not None:
        return int(kv.num_blocks - kv.num_free_blocks)
    return None


def _default_metrics(config: ServerConfig, engine: Any) -> Any:
    try:
        from servekit.metrics.prometheus import PrometheusHook
    except ImportError:
        return False
    name = config.model_names[0] if config.model_names else getattr(engine, "model_name", "model")
    try:
        return PrometheusHook(name, style=config.metrics_style)  # type: ignore[arg-type]
    except ImportError:
        return False


# -- responses -----------------------------------------------------------------------------

def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


async def _generation_response(service: GenerationService, job: Job, encoder: Encoder,
                               stream: bool, config: ServerConfig,
                               usage: UsageRecorder | None = None,
                               extensions: frozenset[str] = frozenset(),
                               attempt: str | None = None) -> Response:
    if usage is not None:
        usage.check_admitting()  # 503 while fail-closed billing is backed up
    headers = (await service.admit(job)).headers  # 429 / 503 here, before anything is sent
    if extensions:
        headers = {**headers, EXTENSIONS_HEADER: ",".join(sorted(extensions))}
    return GenerationResponse(service, job, encoder, stream, headers,
                              send_timeout=config.send_timeout, usage=usage,
                              extensions=extensions, attempt=attempt)


class GenerationResponse(Response):
    """Runs a job while the client is connected; streams SSE or sends one JSON body.

    Headers go out with the first delta, so an error before it (queue full, engine failure)
    still gets its proper status. A client disconnect cancels the job (aborting its engine
    requests and settling its rate limit). ``extensions`` (for a trusted gateway):
    ``token_ids``: each delta's output token ids precede its event as a comment line,
    ``: servekit {"index": i, "token_ids": [...]}``; ``usage``: the job's usage precedes the
    final ``[DONE]`` as ``: servekit {"usage": {...}}``. A resumed job sends no opening chunk
    (the cut stream already did). ``attempt``: recorded as one attempt of a gateway's request
    (analytics only).
    """

    def __init__(self, service: GenerationService, job: Job, encoder: Encoder, stream: bool,
                 headers: dict[str, str], *, send_timeout: float = 30.0,
                 usage: UsageRecorder | None = None,
                 extensions: frozenset[str] = frozenset(), attempt: str | None = None) -> None:
        self.service, self.job, self.encoder, self.stream = service, job, encoder, stream
        self.token_ids = "token_ids" in extensions
        self.usage_comment = USAGE in extensions
        self.attempt = attempt
        self.usage = usage
        self.extra_headers = headers
        self.send_timeout = send_timeout
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw_send = scope.get(_RAW_SEND, send)
        if self.usage is None:
            return await self._respond(scope, receive, send, raw_send)
        # the record, around the final message; the first body part notes the first byte, the
        # parts after it go out raw
        call = track(self.usage, self.job, send, scope, self.attempt)
        try:
            await self._respond(scope, receive, call.send, raw_send)
        finally:
            call.close()  # failed or aborted before the final message: recorded as such

    async def _respond(self, scope: Any, receive: Any, send: Any, raw_send: Any) -> None:
        sender = _StallWatch(send, raw_send, self.send_timeout)
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            if self.stream:
                tg.start_soon(sender.watch, tg.cancel_scope)
                # in a task of its own, each token resumes a few frames, not the whole
                # middleware stack this coroutine runs under
                tg.start_soon(self._stream_then_cancel, sender, tg.cancel_scope)
            else:
                await self._whole(send)
                tg.cancel_scope.cancel()
        if sender.stalled:  # the job was cancelled: aborted and settled on the way out
            logger.warning("%s: the client read nothing for %g s; stream aborted",
                           self.job.request_id, self.send_timeout)

    def _start(self, status: int, content_type: bytes) -> dict[str, Any]:
        headers = [(b"content-type", content_type), (b"x-request-id", self.job.request_id.encode())]
        if self.stream and status == 200:
            headers.append((b"cache-control", b"no-cache"))
        headers.extend((k.encode(), v.encode()) for k, v in self.extra_headers.items())
        return {"type": "http.response.start", "status": status, "headers": headers}

    async def _send_whole(self, send: Any, status: int, body: bytes) -> None:
        start = self._start(status, b"application/json")
        start["headers"].append((b"content-length", str(len(body)).encode()))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Any, exc: StatusError) -> None:
        self.extra_headers.update(exc.headers)
        await self._send_whole(send, exc.status, exc.body())

    async def _stream_then_cancel(self, send: _StallWatch, scope: anyio.CancelScope) -> None:
        await self._stream(send)
        scope.cancel()

    async def _stream(self, send: _StallWatch) -> None:
        encoder = self.encoder
        chunk = encoder.chunk
        opened = started = False  # response start sent; first body part sent
        body = send.body
        with_ids = self.token_ids
        resumed = self.job.resume is not None

        def event(i: int, out: RequestOutput) -> bytes:
            data = chunk(i, out)
            if with_ids and out.new_token_ids:
                data = token_ids_comment(i, out.new_token_ids) + (data or b"\n")
            return data

        def events(i: int, outs: Sequence[RequestOutput]) -> bytes:
            if len(outs) == 1:  # most wake-ups of a consumer that keeps up
                return event(i, outs[0])
            if not with_ids:
                return encoder.chunks(i, outs)
            return b"".join([event(i, out) for out in outs])

        async def on_outputs(i: int, outs: Sequence[RequestOutput]) -> None:
            nonlocal opened, started
            failed = outs[-1]  # only the last delta of a batch can be the engine's error
            if failed.finish_reason == "error":
                if len(outs) > 1:
                    await on_outputs(i, outs[:-1])
                raise StatusError(failed.error or "the engine failed on this request")
            if started:  # the per-token path: the events ready together, in one message
                data = events(i, outs)
                if data:
                    await body(data)
                return
            lead = b""
            if not opened:
                opened = True
                await send(self._start(200, b"text/event-stream"))
                lead = b"" if resumed else encoder.start()  # a resumed stream has opened already
            first = lead + events(i, outs)
            if first:  # through the whole send chain (usage notes the first byte there)
                started = True
                await send({"type": "http.response.body", "body": first, "more_body": True})

        try:
            await self.service.run_batches(self.job, on_outputs)
        except Exception as exc:
            err = _as_api_error(exc)
            if not opened:
                await self._error(send, err)
                return
            await send({"type": "http.response.body", "body": error_event(err.body()),
                        "more_body": True})
            await send({"type": "http.response.body", "body": self._usage_comment() + DONE})
            return
        if not opened:  # nothing was generated (cannot happen with max_tokens >= 1)
            await send(self._start(200, b"text/event-stream"))
        await send({"type": "http.response.body", "body": self._usage_comment() + encoder.end()})

    def _usage_comment(self) -> bytes:
        """The job's usage for the trusted gateway that asked (its ledger record), or b""."""
        return usage_comment(self.job.usage, self.job.finish_reasons) if self.usage_comment else b""

    async def _whole(self, send: Any) -> None:
        add = self.encoder.add

        async def on_output(i: int, out: RequestOutput) -> None:
            if out.finish_reason == "error":
                raise StatusError(out.error or "the engine failed on this request")
            add(i, out)

        try:
            await self.service.run(self.job, on_output)
        except Exception as exc:
            await self._error(send, _as_api_error(exc))
            return
        await self._send_whole(send, 200, self.encoder.body())


class _StallWatch:
    """Wraps ``send``; :meth:`watch` cancels a scope when one send waits over ``timeout`` s.

    A client that stops reading blocks ``send`` (flow control). Each send bumps a counter
    before and after (odd: a send is in flight); the one watcher per response sees a stall as
    the same odd count for ``timeout`` s. Far cheaper than a cancel scope (or a clock read)
    around every chunk.
    """

    __slots__ = ("_raw", "_send", "seq", "stalled", "timeout")

    def __init__(self, send: Any, raw: Any, timeout: float) -> None:
        self._send, self._raw, self.timeout = send, raw, timeout
        self.seq = 0
        self.stalled = False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.seq += 1
        await self._send(message)
        self.seq += 1

    async def body(self, data: bytes) -> None:
        """Send a part of the body once the response started (on the raw send, if any)."""
        self.seq += 1
        await self._raw({"type": "http.response.body", "body": data, "more_body": True})
        self.seq += 1

    async def watch(self, scope: anyio.CancelScope) -> None:
        seen, since = 0, 0.0
        while True:
            await anyio.sleep(self.timeout / 8)
            seq, now = self.seq, time.monotonic()
            if seq != seen or not seq & 1:  # moved on, or nothing in flight
                seen, since = seq, now
            elif now - since >= self.timeout:
                self.stalled = True
                scope.cancel()
                return


def _raw_send(app: FastAPI) -> None:
    """Put the server's own ``send`` into each scope, when no middleware needs to see bodies.

    Starlette's error and exception middlewares wrap ``send`` only to learn that a response
    started; a streamed body sent after that through the wrappers pays four calls per token.
    A user middleware of any other kind (one that may rewrite bodies, e.g. gzip) turns this off.
    """
    build = app.build_middleware_stack

    def build_with_raw_send() -> Any:
        inner = build()
        if any(m.cls not in _PASS_THROUGH for m in app.user_middleware):
            return inner

        async def outermost(scope: Any, receive: Any, send: Any) -> None:
            scope[_RAW_SEND] = send
            await inner(scope, receive, send)

        return outermost

    app.build_middleware_stack = build_with_raw_send  # type: ignore[method-assign]


def _as_api_error(exc: Exception) -> StatusError:
    if isinstance(exc, StatusError):
        return exc
    logger.exception("request failed", exc_info=exc)
    return StatusError(f"internal error: {type(exc).__name__}")


# -- errors --------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StatusError)
        return Response(exc.body(), status_code=exc.status, headers=exc.headers,
                        media_type="application/json")

    def validation_error(request: Request, exc: Exception) -> Response:
        return api_error(request, bad_request_from_validation(exc))

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return Response(error_body(str(exc.detail), kind), status_code=exc.status_code,
                        headers=exc.headers, media_type="application/json")

    def internal_error(request: Request, exc: Exception) -> Response:
        return api_error(request, _as_api_error(exc))

    app.add_exception_handler(StatusError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
