"""The gateway's usage records: the ledger record of each client request.

The tier that answers the client writes the ledger record. Behind a gateway that is the
gateway: one record per client request, whatever happened behind it (retries before the first
byte, failovers after it), under one idempotency key, listing every replica tried, with the
tokens the client is billed for (the prompt and every output once). Each attempt carries
``x-servekit-attempt: <idempotency key>#<n>`` (with the gateway secret), so the replica
records its own compute under that key for analytics only (``ledger`` False) and can never
take the ledger record's place.

The record is appended to the outbox (:class:`servekit.usage.UsageRecorder`, the server's
machinery) before the final chunk goes to the client, and marked sent after it went; a
response that ends otherwise is recorded on the way out with ``final_chunk_sent`` False.
Token counts come from the replica's own report: the ``usage`` stream extension (a comment
before ``[DONE]``, stripped by :class:`~servekit.gateway.failover.StreamTracker`) or a whole
response's ``usage``; without one, the prompt as the gateway tokenized it and the output
token ids relayed, else the usage chunk a client asked for.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from servekit.gateway.failover import StreamTracker
from servekit.gateway.wrapped import WrappedResponse
from servekit.limit.keys import ApiKey
from servekit.usage.recorder import CLIENT_CLOSED, UsageRecorder
from servekit.usage.sink import UsageRecord

__all__ = ["Ledger", "LedgerResponse"]
_NUMBER = {name: re.compile(rb'"' + name.encode() + rb'":\s*(\d+)')
           for name in ("prompt_tokens", "completion_tokens", "cached_tokens")}
_FINISH = re.compile(rb'"finish_reason":\s*"(\w+)"')


class Ledger:
    """The ledger record of one client request, filled in as the request goes."""

    __slots__ = ("_key", "attempts", "body", "failed", "first_at", "key", "model",
                 "prompt_ids", "recorded", "recorder", "replicas", "request_id", "row",
                 "started", "status", "time", "tracker")

    def __init__(self, recorder: UsageRecorder, key: ApiKey | None,
                 headers: Mapping[str, str], model: str, prompt_ids: int | None) -> None:
        self.recorder, self.key, self.model, self.prompt_ids = recorder, key, model, prompt_ids
        client_key = headers.get("idempotency-key")
        #: One per client request: the client's ``Idempotency-Key`` scoped to its key id,
        #: else the gateway's own id for the request.
        self._key = recorder.idempotency_key(recorder.key_id(key), client_key[:200]
                                             if client_key else None, f"gw-{uuid.uuid4().hex}")
        self.time = datetime.now(UTC)
        self.started = time.monotonic()
        self.request_id: str | None = None  # the id the client saw (the replica's)
        self.replicas: list[str] = []
        self.attempts = 0
        self.status = CLIENT_CLOSED
        self.first_at: float | None = None
        #: What the numbers come from: the stream's tracker, or the response body's bytes.
        self.tracker: StreamTracker | None = None
        self.body: bytes | None = None
        #: The stream ended with the gateway's own error (no replica could resume it).
        self.failed = False
        self.row: int | None = None
        self.recorded = False

    @property
    def idempotency_key(self) -> str:
        """The ledger record's idempotency key."""
        return self._key

    def next_attempt(self) -> str:
        """The key of the next attempt (sent to its replica as ``x-servekit-attempt``)."""
        self.attempts += 1
        return f"{self._key}#{self.attempts}"

    def before_final(self) -> None:
        """Append the record now: the final chunk goes to the client next."""
        if not self.recorded:
            self.row = self.recorder.append(self._record(True))

    def after_final(self) -> None:
        """The final chunk went out."""
        if self.row is not None:
            self.recorder.mark_sent(self.row, final_chunk_sent=True)
            self.row = None

    def close(self) -> None:
        """The response is over: record it if it ended before its final chunk."""
        if not self.recorded:
            self.row = self.recorder.append(self._record(False))
        if self.row is not None:
            self.recorder.mark_sent(self.row, final_chunk_sent=False)
            self.row = None

    def _record(self, final: bool) -> UsageRecord:
        self.recorded = True
        prompt, cached, completion, finish = self._numbers()
        if self.status == CLIENT_CLOSED:
            finish = finish or "abort"
        elif self.failed or self.status >= 400 or (not final and finish is None):
            finish = "error"
        key_id = self.recorder.key_id(self.key)
        return UsageRecord(
            request_id=self.request_id or self._key, idempotency_key=self._key,
            time=self.time, key_id=key_id,
            tenant=self.key.tenant if self.key is not None else None, model=self.model,
            replicas=tuple(self.replicas), prompt_tokens=prompt, cached_tokens=min(cached, prompt),
            completion_tokens=completion, finish_reason=finish, http_status=self.status,
            ttft=None if self.first_at is None else self.first_at - self.started,
            total_time=time.monotonic() - self.started, ledger=True)

    def _numbers(self) -> tuple[int, int, int, str | None]:
        """(prompt, cached, completion, finish reason) as billed."""
        tracker = self.tracker
        if tracker is not None and tracker.usage is not None:
            u = tracker.usage
            return (_int(u.get("prompt_tokens")), _int(u.get("cached_tokens")),
                    max(_int(u.get("completion_tokens")), tracker.num_tokens),
                    u.get("finish_reason") or None)
        body = self.body
        if body is not None and b'"usage"' in body:
            found = [_last(body, name) for name in ("prompt_tokens", "cached_tokens",
                                                    "completion_tokens")]
            reasons = sorted({r.decode() for r in _FINISH.findall(body)})
            return found[0], found[1], found[2], ",".join(reasons) or None
        prompt = self.prompt_ids or 0 if self.status < 400 else 0  # a refusal computed nothing
        return prompt, 0, tracker.num_tokens if tracker is not None else 0, None


class LedgerResponse(WrappedResponse):
    """A response that records its ledger record: a ``whole`` one's is appended before its
    body goes out and marked sent after (a stream's relay does that around the chunk holding
    ``[DONE]``); a response that ends otherwise is recorded on the way out."""

    def __init__(self, inner: Response, ledger: Ledger, *, whole: bool = True) -> None:
        super().__init__(inner)
        self.ledger, self.whole = ledger, whole

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ledger = self.ledger

        async def recorded(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                ledger.status = message["status"]
            elif self.whole and not message.get("more_body", False):
                if ledger.first_at is None:
                    ledger.first_at = time.monotonic()
                ledger.before_final()
                await send(message)
                ledger.after_final()
                return
            await send(message)

        try:
            await self.inner(scope, receive, recorded)
        finally:
            ledger.close()
        if self.background is not None:
            await self.background()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _last(body: bytes, name: str) -> int:
    found = _NUMBER[name].findall(body)
    return int(found[-1]) if found else 0
