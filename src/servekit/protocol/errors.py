"""Errors a front end (server, gateway) answers with, in OpenAI's JSON shape.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the
status a client library maps to its exception type: 400 invalid request (``param`` names the
field), 401 bad or missing key, 404 unknown model, 413 payload too large, 429 too many requests, 503 overloaded,
starting or draining. The classes are named after the HTTP answer (``TooManyRequestsError``),
so none shares a name with the client's exceptions, which follow openai-python
(``RateLimitError``, ...), or with the limiter's ``RateLimitExceededError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from servekit.errors import ServekitError

__all__ = [
    "InvalidRequestError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "ServiceUnavailableError",
    "StatusError",
    "TooManyRequestsError",
    "UnauthorizedError",
    "error_body",
    "parse_error_body",
    "retry_after_seconds",
]


class StatusError(ServekitError):
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


class InvalidRequestError(StatusError, ValueError):
    """400: the request is malformed; ``param`` names the offending field."""

    status = 400
    type = "invalid_request_error"


class UnauthorizedError(StatusError):
    """401: no API key, or one the server does not know."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key",
                         headers={"www-authenticate": 'Bearer realm="servekit"'})


class ModelNotFoundError(StatusError, LookupError):
    """404: the request names a model this server does not serve."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model {model!r} does not exist", param="model",
                         code="model_not_found")


class PayloadTooLargeError(StatusError):
    """413: the request body is over the server's limit (``--max-body-bytes``)."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, code="request_too_large")
        self.limit = limit


class TooManyRequestsError(StatusError):
    """429: the key is over a rate limit; the headers carry ``retry-after`` and ``x-ratelimit-*``."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, headers: Mapping[str, str], code: str = "rate_limit_exceeded"
                 ) -> None:
        super().__init__(message, code=code, headers=headers)


class ServiceUnavailableError(StatusError):
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



def parse_error_body(content: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an error response (a non-JSON body becomes its ``message``)."""
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        return {"message": content.decode("utf-8", "replace")[:500]}
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error", parsed)
    return err if isinstance(err, dict) else {"message": str(err)}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The server's requested wait: ``retry-after-ms`` first, then ``retry-after`` in seconds."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if value >= 0:
            return value
    return None
