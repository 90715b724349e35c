"""The server's usage call path: one usage record per finished client request.

Not a metrics hook (hooks are best-effort; billing is not): :class:`UsageRecorder.track`
wraps a generation response's ASGI ``send``. The record is appended to the outbox just before
the final body message goes out, and marked sent once it went; a request that ends otherwise
(failed before the final message, aborted by a disconnect or a stall) is recorded on the way
out with what was computed and ``final_chunk_sent`` False.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from servekit.limit.keys import ApiKey
from servekit.protocol.errors import ServiceUnavailableError
from servekit.server.service import Job
from servekit.usage import Outbox, SinkWorker, UsageRecord, open_sink, sink_name

log = logging.getLogger("servekit.usage")
Send = Callable[[dict[str, Any]], Awaitable[None]]
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response ended"


def default_usage_urls() -> list[str]:
    """The embedded default: a SQLite ledger in the data directory."""
    return ["sqlite://usage.db"]


class UsageRecorder:
    """Writes usage records to an outbox in ``data_dir`` drained into the sinks at ``urls``.

    ``secret`` keys the HMAC that turns an API key into its ``key_id`` (a file
    ``usage-secret`` in ``data_dir`` is created and reused when none is given).
    """

    def __init__(self, data_dir: str | Path, urls: Sequence[str] = (), *,
                 secret: bytes | None = None, replica: str | None = None,
                 max_rows: int = 1_000_000, max_age_s: float = 7 * 86400.0,
                 fail_open: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.urls = list(urls) or default_usage_urls()
        self.secret = secret if secret is not None else self._stored_secret()
        self.replica = replica or socket.gethostname()
        names = [sink_name(u) for u in self.urls]
        self.outbox = Outbox(self.data_dir / "usage-outbox.db", names, max_rows=max_rows,
                             max_age_s=max_age_s, fail_open=fail_open)
        self.workers: list[SinkWorker] = []
        self._names = names
        self._group = _GroupCommit(self.outbox)

    def start(self) -> None:
        """Open the sinks and start a worker per sink (they drain what a previous run left)."""
        for name, url in zip(self._names, self.urls, strict=True):
            worker = SinkWorker(self.outbox, name, open_sink(url, self.data_dir))
            worker.start()
            self.workers.append(worker)

    def stop(self) -> None:
        """Stop the workers (each drains what it can first)."""
        self.outbox.flush()
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def check_admitting(self) -> None:
        """Raise 503 when the outbox is over its bound and billing is fail-closed."""
        if not self.outbox.admitting():
            raise ServiceUnavailableError(
                "usage recording is backed up (the usage outbox is over its bound); try again "
                "later", retry_after=5, code="usage_backlog")

    def key_id(self, key: ApiKey | None) -> str | None:
        """An HMAC-SHA256 of the API key under the server's secret (never the key)."""
        if key is None:
            return None
        return hmac.new(self.secret, key.key.encode(), hashlib.sha256).hexdigest()[:32]

    def track(self, job: Job, send: Send, scope: dict[str, Any]) -> UsageCall:
        """The usage of ``job``'s response, recorded through the returned call's ``send``
        (the start, the first body part and the final one must go through it; the body parts
        between them need not)."""
        return UsageCall(self, job, send, _header(scope, b"idempotency-key"))

    def _stored_secret(self) -> bytes:
        path = self.data_dir / "usage-secret"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            secret = os.urandom(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            return secret


class UsageCall:
    """One response's usage: wraps ``send``; :meth:`close` records an unfinished request."""

    __slots__ = ("_send", "client_key", "first_at", "job", "recorded", "recorder",
                 "started", "status", "time")

    def __init__(self, recorder: UsageRecorder, job: Job, send: Send,
                 client_key: str | None) -> None:
        self.recorder, self.job, self._send, self.client_key = recorder, job, send, client_key
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
        with anyio.CancelScope(shield=True):  # the record is written whatever happens next
            row = await self.recorder._group.append(self._record())
        try:
            await self._send(message)
        except BaseException:
            self.recorder.outbox.mark_sent(row, final_chunk_sent=False)
            raise
        self.recorder.outbox.mark_sent(row, final_chunk_sent=True)

    def close(self) -> None:
        """Record a request that never sent its final message (failed or aborted)."""
        if not self.recorded:
            row = self.recorder.outbox.append(self._record())
            self.recorder.outbox.mark_sent(row, final_chunk_sent=False)

    def _record(self) -> UsageRecord:
        self.recorded = True
        job, recorder = self.job, self.recorder
        key_id = recorder.key_id(job.key)
        reasons = {r for r in job.finish_reasons if r is not None}
        finish = ",".join(sorted(reasons)) or ("abort" if self.status == CLIENT_CLOSED
                                               else "error")
        now = time.monotonic()
        idem = f"{key_id or '-'}:{self.client_key}" if self.client_key else job.request_id
        return UsageRecord(
            request_id=job.request_id, idempotency_key=idem, time=self.time, key_id=key_id,
            tenant=job.key.tenant if job.key is not None else None, model=job.model,
            replicas=(recorder.replica,), prompt_tokens=job.usage.prompt_tokens,
            cached_tokens=job.usage.cached_tokens,
            completion_tokens=job.usage.completion_tokens, finish_reason=finish,
            http_status=self.status, ttft=None if self.first_at is None
            else self.first_at - self.started, total_time=now - self.started)


class _GroupCommit:
    """Appends the records of requests that finish in the same event-loop turn in one
    transaction: the first waits one turn for the others, then commits them all."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._open: _Group | None = None

    async def append(self, record: UsageRecord) -> int | None:
        """Store ``record`` durably (see :meth:`Outbox.append`); its row id. Not cancellable
        midway: call it shielded."""
        group = self._open
        if group is not None:
            index = len(group.records)
            group.records.append(record)
            await group.done.wait()
        else:
            group = self._open = _Group([record])
            index = 0
            try:
                await anyio.sleep(0)  # let the requests finishing in this turn join
            finally:
                self._open = None
                try:
                    group.ids = self.outbox.append_many(group.records)
                except Exception as exc:
                    group.error = exc
                group.done.set()
        if group.error is not None:
            raise group.error
        return group.ids[index]


class _Group:
    __slots__ = ("done", "error", "ids", "records")

    def __init__(self, records: list[UsageRecord]) -> None:
        self.records = records
        self.ids: list[int | None] = []
        self.error: Exception | None = None
        self.done = anyio.Event()


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")[:200]
            return text
    return None
