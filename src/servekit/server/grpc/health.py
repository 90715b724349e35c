"""The standard gRPC health service (``grpc.health.v1.Health``), read from the server's state.

SERVING while the server accepts requests, NOT_SERVING while it starts, drains or has failed,
for the whole server (``""``) and for ``servekit.v1.Generation``. ``Watch`` re-reads the state
every ``poll_interval`` seconds and sends each change.
"""

from __future__ import annotations

from typing import Any

import anyio

from servekit._optional import require
from servekit.server.lifecycle import ServerState

grpc = require("grpc", "grpc")
require("grpc_health.v1", "grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

__all__ = ["StateHealthServicer"]


class StateHealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health of ``services`` (plus the whole server, ``""``) from a :class:`ServerState`."""

    def __init__(self, state: ServerState, services: tuple[str, ...],
                 poll_interval: float = 0.5) -> None:
        self.state = state
        self.services = frozenset(("", *services))
        self.poll_interval = poll_interval

    def status(self, service: str) -> int:
        """The HealthCheckResponse status of ``service``."""
        if service not in self.services:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if self.state.ready:
            return int(health_pb2.HealthCheckResponse.SERVING)
        return int(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(self, request: Any, context: Any) -> Any:
        """The current status; NOT_FOUND for a service this server does not know."""
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def Watch(self, request: Any, context: Any) -> None:
        """The current status, then every change, until the client goes away."""
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await anyio.sleep(self.poll_interval)
