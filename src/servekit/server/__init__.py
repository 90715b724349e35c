"""servekit.server: the OpenAI-compatible HTTP front end and the parts it is built from.

``create_app(engine)`` assembles the ASGI app; ``GenerationService`` is the transport-independent
core (keys, limits, generation) other front ends reuse; ``FakeEngine`` is an instant engine for
tests and benchmarks. Needs ``servekit[server]`` (FastAPI, uvicorn, and the engine's extra).
"""

from typing import TYPE_CHECKING

from servekit._optional import require

require("fastapi", "server")

from servekit._deprecation import moved_names
from servekit.limit.keyed import Admission, KeyLimits
from servekit.limit.keys import ApiKey, KeyConfigError, KeyStore
from servekit.protocol import errors as _errors
from servekit.server.fake import FakeEngine
from servekit.server.lifecycle import Phase, ServerState
from servekit.server.service import EngineLike, GenerationService, Job, JobUsage

if TYPE_CHECKING:  # imported on first use (below); typed for checkers from here
    from servekit.server.app import ServerConfig, create_app

__all__ = [
    "Admission",
    "ApiKey",
    "EngineLike",
    "FakeEngine",
    "GenerationService",
    "Job",
    "JobUsage",
    "KeyConfigError",
    "KeyLimits",
    "KeyStore",
    "Phase",
    "ServerConfig",
    "ServerState",
    "create_app",
]

# Deprecated aliases (removed in the next release): the HTTP errors moved to
# servekit.protocol.errors under names distinct from the client's; Usage is JobUsage.
APIError = _errors.StatusError
AuthenticationError = _errors.UnauthorizedError
BadRequestError = _errors.InvalidRequestError
ModelNotFoundError = _errors.ModelNotFoundError
OverloadedError = _errors.ServiceUnavailableError
RateLimitedError = _errors.TooManyRequestsError
Usage = JobUsage
_moved = moved_names(__name__, {"FakeTokenizer": "servekit.server.fake"})


def __getattr__(name: str) -> object:
    # the app needs FastAPI (servekit[server]): import it only when asked for
    if name in ("create_app", "ServerConfig"):
        from servekit.server import app

        return getattr(app, name)
    return _moved(name)
