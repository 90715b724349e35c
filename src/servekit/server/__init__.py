"""servekit.server: the OpenAI-compatible HTTP front end and the parts it is built from.

``create_app(engine)`` assembles the ASGI app; ``GenerationService`` is the transport-independent
core (keys, limits, generation) other front ends reuse; ``FakeEngine`` is an instant engine for
tests and benchmarks. Needs ``servekit[server]`` (FastAPI, uvicorn, and the engine's extra).
"""

from servekit._optional import require

require("fastapi", "server")

from servekit.protocol.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ModelNotFoundError,
    OverloadedError,
    RateLimitedError,
)
from servekit.server.fake import FakeEngine, FakeTokenizer
from servekit.server.keys import ApiKey, KeyConfigError, KeyStore
from servekit.server.lifecycle import Phase, ServerState
from servekit.server.ratelimit import Admission, KeyLimits
from servekit.server.service import EngineLike, GenerationService, Job, Usage

__all__ = [
    "APIError",
    "Admission",
    "ApiKey",
    "AuthenticationError",
    "BadRequestError",
    "EngineLike",
    "FakeEngine",
    "FakeTokenizer",
    "GenerationService",
    "Job",
    "KeyConfigError",
    "KeyLimits",
    "KeyStore",
    "ModelNotFoundError",
    "OverloadedError",
    "Phase",
    "RateLimitedError",
    "ServerConfig",
    "ServerState",
    "Usage",
    "create_app",
]


def __getattr__(name: str) -> object:
    # the app needs FastAPI (servekit[server]): import it only when asked for
    if name in ("create_app", "ServerConfig"):
        from servekit.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'servekit.server' has no attribute {name!r}")
