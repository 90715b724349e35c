"""The server's usage call path: one usage record per finished client request.

Not a metrics hook (hooks are best-effort; billing is not): :func:`track` wraps a generation
response's ASGI ``send``. The record is appended to the outbox just before the final body
message goes out, and marked sent once it went; a request that ends otherwise (failed before
the final message, aborted by a disconnect or a stall) is recorded on the way out with what
was computed and ``final_chunk_sent`` False.

Behind a trusted gateway (the request carries the gateway secret) the gateway writes the
ledger record; the server records each attempt's compute (replayed prefill included) for
analytics only: ``ledger`` False, keyed by the gateway's attempt key
(``x-servekit-attempt``), so no attempt can take the ledger record's place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from servekit.server.service import Job
from servekit.usage.record_codec import make_row
from servekit.usage.recorder import CLIENT_CLOSED, UsageRecorder, default_usage_urls

__all__ = ["CLIENT_CLOSED", "UsageCall", "UsageRecorder", "default_usage_urls", "track"]

Send = Callable[[dict[str, Any]], Awaitable[None]]


def track(recorder: UsageRecorder, job: Job, send: Send, scope: dict[str, Any],
          attempt: str | None = None) -> UsageCall:
    """The usage of ``job``'s response, recorded through the returned call's ``send``
    (the start, the first body part and the final one must go through it; the body parts
    between them need not). ``attempt``: the request is one attempt of a trusted gateway's
    (its attempt key, or ``""`` when it sent none): recorded for analytics only."""
    return UsageCall(recorder, job, send, _header(scope, b"idempotency-key"), attempt)


class UsageCall:
    """One response's usage: wraps ``send``; :meth:`close` records an unfinished request."""

    __slots__ = ("_send", "attempt", "client_key", "first_at", "job", "recorded", "recorder",
                 "started", "status", "time")

    def __init__(self, recorder: UsageRecorder, job: Job, send: Send,
                 client_key: str | None, attempt: str | None = None) -> None:
        self.recorder, self.job, self._send, self.client_key = recorder, job, send, client_key
        self.attempt = attempt
        self.time = datetime.now(UTC)
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.status = CLIENT_CLOSED
        self.recorded = False

    async def send(self, message: dict[str, Any]) -> None:
        """Forward ``message``; around the final body message, append then mark the record."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            await self._send(message)
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
        if message.get("more_body", False) or self.recorded:
            await self._send(message)
            return
        recorder = self.recorder
        row = recorder.append_row(self._row())  # durable before the final message goes
        try:
            await self._send(message)
        except BaseException:
            recorder.mark_sent(row, final_chunk_sent=False)
            raise
        recorder.mark_sent(row, final_chunk_sent=True)

    def close(self) -> None:
        """Record a request that never sent its final message (failed or aborted)."""
        if not self.recorded:
            row = self.recorder.append_row(self._row())
            self.recorder.mark_sent(row, final_chunk_sent=False)

    def _row(self) -> tuple[Any, ...]:
        """The record as the outbox stores it, built directly (no :class:`UsageRecord`)."""
        self.recorded = True
        job, recorder = self.job, self.recorder
        key = job.key
        key_id = recorder.key_id(key)
        finish = ",".join(sorted({r for r in job.finish_reasons if r is not None})) or (
            "abort" if self.status == CLIENT_CLOSED else "error")
        now = time.monotonic()
        if self.attempt is None:
            idem = recorder.idempotency_key(key_id, self.client_key, job.request_id)
        else:  # one attempt of a gateway's request: never the ledger record's key
            idem = self.attempt or f"attempt:{job.request_id}:{os.urandom(6).hex()}"
        usage = job.usage
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        if self.attempt is not None and job.resume:  # this attempt prefilled the replayed ids
            replayed = min(sum(map(len, job.resume)), completion)
            prompt, completion = prompt + replayed, completion - replayed
        return make_row(
            idem, job.request_id, self.time.isoformat(), key_id,
            key.tenant if key is not None else None, job.model, recorder.replica, prompt,
            usage.cached_tokens, completion, finish, self.status, None,
            None if self.first_at is None else self.first_at - self.started,
            now - self.started, False, self.attempt is None)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")[:200]
            return text
    return None
