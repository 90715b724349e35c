"""The gateway's ASGI app: the OpenAI endpoints forwarded to the fleet, plus ops endpoints."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from servekit.gateway.admin import mount_admin
from servekit.gateway.budget import RetryBudget
from servekit.gateway.edge import Edge
from servekit.gateway.fleet import Fleet
from servekit.gateway.forward import Forwarder, unavailable
from servekit.gateway.metrics import GatewayMetrics
from servekit.gateway.tracing import GatewayTracer
from servekit.gateway.upstream import Upstream
from servekit.limit.keyed import KeyLimits
from servekit.limit.keys import KeyStore
from servekit.usage.recorder import UsageRecorder

log = logging.getLogger("servekit.gateway")

_FORWARDED = ("/v1/completions", "/v1/chat/completions")


def create_gateway(replicas: Sequence[str], *, policy: str = "cache_aware",
                   secret: str | None = None, probe_interval: float = 0.5,
                   budget: RetryBudget | None = None, max_connections: int = 512,
                   keys: KeyStore | None = None, limits: KeyLimits | None = None,
                   max_failovers: int = 3, slow_start: float = 0.0,
                   replicas_file: str | Path | None = None,
                   usage: UsageRecorder | None = None, failure_threshold: int = 3,
                   cooldown: float = 2.0, tracer: GatewayTracer | None = None) -> FastAPI:
    """The gateway app over ``replicas`` (base URLs). ``secret`` is the replicas' shared
    gateway secret (their info, KV events and load, token ids for failover, the caller's
    tenant and cache salt); without it routing uses in-flight counts only and streams do not
    fail over after their first byte. ``keys`` and ``limits`` authenticate and limit callers
    at the edge (:mod:`servekit.gateway.edge`; a Redis store in ``limits`` shares the limits
    between gateways); without keys the gateway is open. ``slow_start`` seconds ramp a replica
    that comes back (:class:`~servekit.route.Router`'s slow start; 0: off). ``replicas_file``
    lists more replicas, one base URL per line; the gateway re-reads it every
    ``probe_interval`` seconds and adds and removes replicas as it changes. ``usage`` records
    the ledger record of each client request (:mod:`servekit.gateway.usage`; the replicas,
    given the secret, record their attempts for analytics only). A replica's circuit breaker
    opens after ``failure_threshold`` consecutive failures; ``cooldown`` seconds later one
    probe request is let through, and its success closes the breaker (a replica the readiness
    probe took out is half-open as soon as it is ready again). ``tracer`` makes an
    OpenTelemetry span per client request with a child per replica attempt
    (:mod:`servekit.gateway.tracing`)."""
    if not replicas and replicas_file is None:
        raise ValueError("replicas: at least one replica URL (or a replicas file) is required")
    if usage is not None and secret is None:
        log.warning("usage: without the gateway secret the replicas cannot tell this gateway's "
                    "requests from a client's and write ledger records of their own (counted "
                    "twice): set SERVEKIT_GATEWAY_SECRET on both, or record on one tier only")
    fleet = Fleet(replicas, policy=policy, secret=secret, probe_interval=probe_interval,
                  slow_start=slow_start, replicas_file=replicas_file,
                  failure_threshold=failure_threshold, cooldown=cooldown)
    keys = keys if keys is not None else KeyStore()
    edge = None if keys.open else Edge(  # open: no caller has limits either
        keys, limits if limits is not None else KeyLimits(), fleet)
    metrics = GatewayMetrics()
    pool = httpx.Limits(max_connections=max_connections,
                        max_keepalive_connections=max_connections)
    timeout = httpx.Timeout(connect=2.0, read=None, write=30.0, pool=30.0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(limits=pool, timeout=timeout) as client:
            upstream = Upstream(connect_timeout=timeout.connect or 2.0, max_idle=max_connections)
            app.state.forwarder = Forwarder(fleet, upstream, budget or RetryBudget(), metrics,
                                            max_failovers=max_failovers, edge=edge, usage=usage,
                                            tracer=tracer)
            if usage is not None:
                usage.start()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fleet.run, client)
                    yield
                    tg.cancel_scope.cancel()
            finally:
                await upstream.aclose()
                if usage is not None:
                    await anyio.to_thread.run_sync(usage.stop)

    app = FastAPI(title="servekit gateway", lifespan=lifespan)
    app.state.fleet = fleet
    mount_admin(app, fleet, keys, has_admin=keys.has_admin)

    async def forward(request: Request) -> Response:
        forwarder: Forwarder = request.app.state.forwarder
        return await forwarder.forward(request.method, request.url.path,
                                       dict(request.headers), await request.body())

    for path in _FORWARDED:
        app.add_api_route(path, forward, methods=["POST"], tags=["openai"])

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> Response:
        """The models the replicas serve (as they reported them), else a replica's list."""
        names = sorted({m for ms in fleet.models.values() for m in ms})
        if names:
            return JSONResponse({"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "servekit"}
                for n in names]})
        return await forward(request)

    @app.get("/health", tags=["ops"])
    async def health() -> Response:
        """Liveness of the gateway process itself."""
        return JSONResponse({"status": "ok"})

    @app.get("/ready", tags=["ops"])
    async def ready() -> Response:
        """200 while at least one replica can take a request (in rotation, or half-open
        with a probe request to let through)."""
        health = fleet.router.health
        states = {u: health.state(u).value for u in fleet.urls}
        if any(health.routable(u) for u in fleet.urls):
            return JSONResponse({"ready": True, "replicas": states})
        return unavailable("no replica is ready") if not states else JSONResponse(
            {"ready": False, "replicas": states}, status_code=503,
            headers={"retry-after": "1"})

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        """Prometheus metrics of the gateway."""
        health = fleet.router.health
        metrics.breaker({u: health.state(u).value for u in fleet.urls})
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
