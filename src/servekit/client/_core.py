"""What the sync and async clients share: timeouts, the retry policy, SSE and error parsing."""

from __future__ import annotations

import json
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

RETRYABLE = (RateLimitError, OverloadedError, APIConnectionError)


@frozen(slots=True)
class Timeout:
    """Seconds allowed to connect, to wait for each read, and for the whole call (retries included)."""

    connect: float = 5.0
    read: float = 60.0
    total: float | None = None


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
    body: dict[str, Any] | None = None
    try:
        parsed = json.loads(content) if content else None
        if isinstance(parsed, dict):
            err = parsed.get("error", parsed)
            body = err if isinstance(err, dict) else {"message": str(err)}
    except ValueError:
        body = {"message": content.decode("utf-8", "replace")[:500]}
    return error_for_status(status_code, body, {k.lower(): v for k, v in headers.items()})


class SSEDecoder:
    """Turns the lines of a server-sent-event stream into JSON payloads.

    ``feed(line)`` returns the decoded payload of an event when ``line`` ends it (a blank line;
    an event's ``data:`` lines are joined with newlines, as the SSE spec says), ``DONE`` for
    ``data: [DONE]``, or None otherwise (comments, other fields, an event still open).
    ``flush()`` ends the last event when the stream closes without a blank line.
    """

    DONE: Any = object()

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Any:
        """Decode one line of the stream."""
        if not line:
            return self.flush()
        if not line.startswith("data:"):
            return None
        value = line[5:]
        if value.startswith(" "):
            value = value[1:]
        if not self._data and value.strip() == "[DONE]":
            return self.DONE
        self._data.append(value)
        return None

    def flush(self) -> Any:
        """Decode the event whose data lines were fed (None when there is none)."""
        data = "\n".join(self._data).strip()
        self._data.clear()
        if not data:
            return None
        if data == "[DONE]":
            return self.DONE
        payload = json.loads(data)
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
