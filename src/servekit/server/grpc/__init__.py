"""servekit's gRPC front end (``servekit[grpc]``): ``servekit.v1.Generation`` over grpc.aio.

Unary ``Generate``, server-streaming ``GenerateStream`` and the bidirectional ``Session`` (many
requests multiplexed on one stream, each cancellable), built on the HTTP server's
:class:`~servekit.server.service.GenerationService`, so both share keys, limits and metrics;
the standard health service and server reflection; and the ``google.api.http`` REST mapping
(:func:`rest_router`) for the HTTP app. The ``.proto`` and the generated code live in
:mod:`servekit.protocol` (:data:`PROTO_PATH`, ``servekit.protocol.grpc_gen``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = [
    "PROTO_PATH",
    "SERVICE_NAME",
    "GenerationServicer",
    "GrpcServer",
    "StateHealthServicer",
    "rest_router",
    "serve_beside",
]

#: The path of ``servekit.proto`` inside the installed package.
PROTO_PATH = Path(str(files("servekit.protocol") / "servekit.proto"))

_LAZY = {
    "SERVICE_NAME": "servekit.server.grpc.server",
    "GrpcServer": "servekit.server.grpc.server",
    "serve_beside": "servekit.server.grpc.server",
    "GenerationServicer": "servekit.server.grpc.service",
    "StateHealthServicer": "servekit.server.grpc.health",
    "rest_router": "servekit.server.grpc.rest",
}


def __getattr__(name: str) -> object:
    # grpcio / FastAPI are optional: import them only when a name that needs them is asked for
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit.server.grpc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
