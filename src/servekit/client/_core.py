"""What the sync and async clients share: timeouts, the retry policy, stream and error parsing."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

from attrs import define, field, frozen

from servekit.client.errors import (
    APIConnectionError,
    APIStatusError,
    ClientError,
    OverloadedError,
    RateLimitError,
    error_for_status,
)
from servekit.protocol.errors import parse_error_body, retry_after_seconds
from servekit.protocol.sse import parse_data

RETRYABLE = (RateLimitError, OverloadedError, APIConnectionError)


@frozen(slots=True)
class Timeout:
    """Seconds allowed to connect, to wait for each read, and for the whole call (retries included)."""

    connect: float = 5.0
    read: float = 60.0
    total: float | None = None


@define(slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter on 429, 503 and connection errors.

    A ``retry-after`` from the server is honoured exactly (it knows when capacity returns);
    otherwise attempt ``k`` waits ``uniform(0, min(max_delay, base_delay * 2**k))``.
    """

    max_retries: int = 2
    base_delay: float = 0.5
    max_delay: float = 8.0
    rng: random.Random = field(factory=random.Random)

    def next_delay(self, attempt: int, error: ClientError, remaining: float | None) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None to give up and raise ``error``."""
        if attempt >= self.max_retries or not isinstance(error, RETRYABLE):
            return None
        delay: float | None = None
        if isinstance(error, APIStatusError):
            delay = retry_after_seconds(error.headers)
        if delay is None:
            delay = self.rng.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))
        if remaining is not None and delay >= remaining:
            return None
        return delay


def error_from_response(status_code: int, headers: Mapping[str, str], content: bytes) -> APIStatusError:
    """Parse an OpenAI-shaped error body (``{"error": {...}}``) into the right exception."""
    return error_for_status(status_code, parse_error_body(content),
                            {k.lower(): v for k, v in headers.items()})


def decode_event(data: str) -> Any:
    """The JSON payload of one stream event, ``DONE_DATA`` for the end marker; an error event
    (``{"error": {...}}``) raises the matching exception."""
    payload = parse_data(data)
    if isinstance(payload, dict) and "error" in payload:
        err = payload["error"]
        status = int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500
        raise error_for_status(status, err, {})
    return payload


def request_body(params: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The JSON body: ``None`` parameters are left out so the server's defaults apply."""
    body = {k: v for k, v in params.items() if v is not None}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer header, when there is a key."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class _RetryingBase:
    """What the HTTP and gRPC clients, sync and async, share: timeouts, retry policy, deadline."""

    def __init__(self, timeout: Timeout, retry: RetryPolicy | None) -> None:
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()

    def _deadline(self) -> float | None:
        """When a whole call (retries included) must be over, on the monotonic clock."""
        return None if self.timeout.total is None else time.monotonic() + self.timeout.total

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        """Seconds left before ``deadline``, never negative (None: no deadline)."""
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _retry_delay(self, attempt: int, error: ClientError, deadline: float | None) -> float:
        """Seconds to wait before retry ``attempt + 1``; raises ``error`` when the policy gives up."""
        delay = self.retry.next_delay(attempt, error, self._remaining(deadline))
        if delay is None:
            raise error
        return delay
