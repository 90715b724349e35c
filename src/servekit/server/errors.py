"""Errors the HTTP front end answers with, in OpenAI's JSON shape.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the
status a client library maps to its exception type: 400 bad request (``param`` names the field),
401 bad or missing key, 404 unknown model or route, 413 body too large, 429 rate limited, 503 overloaded or draining.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from servekit.errors import ServekitError

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "error_body",
]


class APIError(ServekitError):
    """An error with an HTTP status and OpenAI's error fields; ``headers`` go on the response."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, self.param, self.code)


class BadRequestError(APIError, ValueError):
    """400: the request is malformed; ``param`` names the offending field."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key",
                         headers={"www-authenticate": 'Bearer realm="servekit"'})


class ModelNotFoundError(APIError, LookupError):
    """404: the request names a model this server does not serve."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model {model!r} does not exist", param="model",
                         code="model_not_found")


class PayloadTooLargeError(APIError):
    """413: the request body is over the server's limit (``--max-body-bytes``)."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, code="request_too_large")
        self.limit = limit


class RateLimitedError(APIError):
    """429: the key is over a rate limit; the headers carry ``retry-after`` and ``x-ratelimit-*``."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, headers: Mapping[str, str], code: str = "rate_limit_exceeded"
                 ) -> None:
        super().__init__(message, code=code, headers=headers)


class OverloadedError(APIError):
    """503: the waiting queue is full or the server is draining; ``retry-after`` says when to retry."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, *, retry_after: float, code: str = "overloaded") -> None:
        seconds = max(1, round(retry_after + 0.4999))
        super().__init__(message, code=code, headers={"retry-after": str(seconds)})


def error_body(message: str, type: str, param: str | None = None, code: str | None = None
               ) -> bytes:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"error": {"message": message, "type": type, "param": param, "code": code}}
    try:
        return json.dumps(error, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate echoed from the request: escape it
        return json.dumps(error).encode()
