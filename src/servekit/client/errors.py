"""One exception class per failure kind, so a caller knows what to do with each."""

from __future__ import annotations

from typing import Any

from servekit.errors import ServekitError
from servekit.protocol.errors import retry_after_seconds


class ClientError(ServekitError):
    """Base class of every error the client raises."""


class APIConnectionError(ClientError):
    """The server could not be reached (refused, reset, DNS); retried by default."""


class APITimeoutError(APIConnectionError):
    """A connect, read or total timeout expired."""


class APIStatusError(ClientError):
    """The server answered with an error status; ``body`` is its OpenAI-shaped error object."""

    def __init__(self, message: str, *, status_code: int, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body or {}
        self.headers = headers or {}
        self.type: str | None = self.body.get("type")
        self.code: str | None = self.body.get("code")


class BadRequestError(APIStatusError):
    """400: the request is invalid; ``param`` names the offending field when the server says."""

    @property
    def param(self) -> str | None:
        """The name of the bad field, if the server named one."""
        value = self.body.get("param")
        return str(value) if value is not None else None


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: unknown model or route."""


class RateLimitError(APIStatusError):
    """429: rate limited; ``retry_after`` (seconds) and ``limits`` come from the headers."""

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before retrying, from ``retry-after-ms`` or ``retry-after``."""
        return retry_after_seconds(self.headers)

    @property
    def limits(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers, without the prefix (``limit-requests`` ...)."""
        prefix = "x-ratelimit-"
        return {k[len(prefix):]: v for k, v in self.headers.items() if k.startswith(prefix)}


class OverloadedError(APIStatusError):
    """503: the server is overloaded or draining; retried by default."""


class InternalServerError(APIStatusError):
    """Any other 5xx."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: BadRequestError,
    429: RateLimitError,
    503: OverloadedError,
}


def error_for_status(status_code: int, body: dict[str, Any] | None,
                     headers: dict[str, str]) -> APIStatusError:
    """The exception for an error response (``body`` is the ``error`` object, if any)."""
    cls = _STATUS_ERRORS.get(status_code)
    if cls is None:
        cls = InternalServerError if status_code >= 500 else APIStatusError
    message = (body or {}).get("message") or f"HTTP {status_code}"
    return cls(f"{status_code}: {message}", status_code=status_code, body=body, headers=headers)
