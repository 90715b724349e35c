"""The server's API errors as gRPC statuses and as the REST mapping's error bodies.

An :class:`~servekit.protocol.errors.StatusError` carries an HTTP status, OpenAI's error fields and
headers. Here it becomes a ``google.rpc.Status``: the canonical code (400 INVALID_ARGUMENT,
401 UNAUTHENTICATED, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, else INTERNAL),
an ``ErrorInfo`` holding the error code, type, field and headers, a ``BadRequest`` naming the
field, a ``RetryInfo`` with the wait; and the headers themselves (``retry-after``,
``retry-after-ms``, ``x-ratelimit-*``) as trailing metadata.
"""

from __future__ import annotations

import contextlib
from typing import Any

from servekit._optional import require
from servekit.protocol.errors import StatusError

require("google.rpc", "grpc")
from google.protobuf import any_pb2, duration_pb2  # noqa: E402
from google.rpc import code_pb2, error_details_pb2, status_pb2  # noqa: E402

__all__ = ["DETAILS_KEY", "grpc_code", "http_status", "metadata_headers", "to_status",
           "trailing_metadata"]

#: The trailing-metadata key of the binary ``google.rpc.Status`` (the gRPC rich error model).
DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "servekit"

_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    413: code_pb2.RESOURCE_EXHAUSTED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}
# google.rpc.Code -> HTTP status, as gRPC-HTTP transcoding maps them
_HTTP = {
    code_pb2.OK: 200, code_pb2.CANCELLED: 499, code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504, code_pb2.NOT_FOUND: 404, code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401, code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400, code_pb2.UNIMPLEMENTED: 501,
    code_pb2.UNAVAILABLE: 503, code_pb2.INTERNAL: 500,
}
# headers that mean nothing outside HTTP
_HTTP_ONLY = frozenset({"www-authenticate"})


def grpc_code(exc: StatusError) -> int:
    """The ``google.rpc.Code`` value of an API error."""
    return int(_CODES.get(exc.status, code_pb2.INTERNAL))


def http_status(code: int) -> int:
    """The HTTP status of a ``google.rpc.Code`` value."""
    return _HTTP.get(code, 500)


def metadata_headers(exc: StatusError) -> dict[str, str]:
    """The error's headers that travel with it over gRPC, ``retry-after-ms`` filled in."""
    headers = {k.lower(): v for k, v in exc.headers.items() if k.lower() not in _HTTP_ONLY}
    if "retry-after" in headers and "retry-after-ms" not in headers:
        with contextlib.suppress(ValueError):
            headers["retry-after-ms"] = str(round(float(headers["retry-after"]) * 1000))
    return headers


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: StatusError) -> Any:
    """The ``google.rpc.Status`` of an API error, with ErrorInfo, BadRequest and RetryInfo."""
    headers = metadata_headers(exc)
    info = {"type": exc.type, **headers}
    if exc.param:
        info["param"] = exc.param
    details = [_pack(error_details_pb2.ErrorInfo(reason=(exc.code or exc.type).upper(),
                                                 domain=DOMAIN, metadata=info))]
    if exc.param:
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.param,
                                                                description=exc.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    delay_ms = headers.get("retry-after-ms")
    if delay_ms is not None:
        ms = int(float(delay_ms))
        delay = duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=grpc_code(exc), message=exc.message, details=details)


def trailing_metadata(exc: StatusError, status: Any | None = None) -> tuple[tuple[str, Any], ...]:
    """Trailing metadata of a failed call: the headers and the binary status details."""
    status = status if status is not None else to_status(exc)
    return (*metadata_headers(exc).items(), (DETAILS_KEY, status.SerializeToString()))
