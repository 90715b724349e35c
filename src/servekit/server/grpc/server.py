"""Build and run the gRPC server: ``Generation``, the standard health service and reflection.

    service = GenerationService(engine, keys=keys)      # or app.state.servekit of the HTTP app
    async with GrpcServer(service, port=50051) as server:
        await server.wait_for_termination()

:func:`serve_beside` runs it next to a uvicorn server on the same event loop and the same
GenerationService, so HTTP and gRPC share one engine, one set of keys, limits and metrics,
and one drain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from servekit._optional import require
from servekit.server.grpc.health import StateHealthServicer
from servekit.server.grpc.service import GenerationServicer, add_generation_servicer
from servekit.server.service import GenerationService

grpc = require("grpc", "grpc")
require("grpc_reflection", "grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402

__all__ = ["SERVICE_NAME", "GrpcServer", "serve_beside"]

logger = logging.getLogger("servekit.server.grpc")

#: The full name of the generation service.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Generation"].full_name

_DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
    ("grpc.max_receive_message_length", 16 * 2**20),
)


class GrpcServer:
    """A grpc.aio server for one :class:`GenerationService`, with health and reflection.

    ``port=0`` picks a free port; :attr:`port` is the bound one after :meth:`start`.
    """

    def __init__(self, service: GenerationService, *, host: str = "127.0.0.1", port: int = 0,
                 reflection: bool = True, options: Sequence[tuple[str, Any]] = (),
                 health_poll_interval: float = 0.5) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.reflection = reflection
        self.options = (*_DEFAULT_OPTIONS, *options)
        self.health = StateHealthServicer(service.state, (SERVICE_NAME,), health_poll_interval)
        self._server: Any = None

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving; returns the port."""
        server = grpc.aio.server(options=self.options)
        add_generation_servicer(GenerationServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot bind the gRPC server to {self.host}:{self.port}")
        await server.start()
        self._server, self.port = server, int(bound)
        logger.info("gRPC serving %s on %s", SERVICE_NAME, self.address)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; give in-flight ones ``grace`` seconds, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)


async def serve_beside(http_server: Any, service: GenerationService, *, host: str, port: int,
                       grace_period: float = 5.0) -> None:
    """Serve gRPC on ``host:port`` while ``http_server`` (a ``uvicorn.Server``) runs.

    Both use ``service``, the HTTP app's ``app.state.servekit``: one engine, one drain. The
    HTTP lifespan drains the shared state on shutdown (in-flight gRPC calls included), then
    the gRPC server stops.
    """
    grpc_server = GrpcServer(service, host=host, port=port)
    await grpc_server.start()
    try:
        await http_server.serve()
    finally:
        service.state.begin_drain()
        await grpc_server.stop(grace_period)
