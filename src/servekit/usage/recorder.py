"""What a serving tier (``servekit serve`` or ``servekit gateway``) records usage with.

:class:`UsageRecorder` owns the outbox in a data directory, one :class:`SinkWorker` per sink,
the secret that turns an API key into its ``key_id``, and the group commit that appends the
records of requests finishing in the same event-loop turn in one transaction. The tier's own
call path (the server's ASGI ``send`` wrapper, the gateway's relay) builds the records.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servekit.limit.keys import ApiKey
from servekit.protocol.errors import ServiceUnavailableError
from servekit.usage.outbox import Outbox
from servekit.usage.record_codec import stored_row
from servekit.usage.sink import UsageRecord
from servekit.usage.sinks import open_sink, sink_name
from servekit.usage.worker import SinkWorker

__all__ = ["UsageRecorder", "default_usage_urls"]

log = logging.getLogger("servekit.usage")

CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response ended"


def default_usage_urls() -> list[str]:
    """The embedded default: a SQLite ledger in the data directory."""
    return ["sqlite://usage.db"]


class UsageRecorder:
    """Writes usage records to an outbox in ``data_dir`` drained into the sinks at ``urls``.

    ``secret`` keys the HMAC that turns an API key into its ``key_id`` (a file
    ``usage-secret`` in ``data_dir`` is created and reused when none is given); ``replica``
    names this process in its records (default: the host name); ``outbox`` is the outbox's
    file name in ``data_dir`` (the gateway's differs from the server's, so both may share a
    data directory and its ``sqlite://`` sink).
    """

    def __init__(self, data_dir: str | Path, urls: Sequence[str] = (), *,
                 secret: bytes | None = None, replica: str | None = None,
                 max_rows: int = 1_000_000, max_age_s: float = 7 * 86400.0,
                 fail_open: bool = False, outbox: str = "usage-outbox.db") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.urls = list(urls) or default_usage_urls()
        self.secret = secret if secret is not None else self._stored_secret()
        self.replica = replica or socket.gethostname()
        names = [sink_name(u) for u in self.urls]
        self.outbox = Outbox(self.data_dir / outbox, names, max_rows=max_rows,
                             max_age_s=max_age_s, fail_open=fail_open)
        self.workers: list[SinkWorker] = []
        self._names = names
        self._group = _GroupCommit(self.outbox)
        self._key_ids: dict[str, str] = {}

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
        """An HMAC-SHA256 of the API key under the recorder's secret (never the key);
        computed once per key."""
        if key is None:
            return None
        found = self._key_ids.get(key.key)
        if found is None:
            if len(self._key_ids) >= 65536:  # keys are few; a flood of new ones is bounded
                self._key_ids.clear()
            found = self._key_ids[key.key] = hmac.new(
                self.secret, key.key.encode(), hashlib.sha256).hexdigest()[:32]
        return found

    @staticmethod
    def idempotency_key(key_id: str | None, client_key: str | None, request_id: str) -> str:
        """The record's key: the client's ``Idempotency-Key`` scoped to its key id, else the
        request id."""
        return f"{key_id or '-'}:{client_key}" if client_key else request_id

    async def append(self, record: UsageRecord) -> int | None:
        """Store ``record`` durably before the response's final chunk (group commit with the
        requests finishing in the same loop turn); its outbox row id (None: dropped,
        fail-open). A caller cancelled meanwhile still has its record written (marked as
        ended without its final chunk)."""
        return await self._group.append(stored_row(record))

    async def append_row(self, row: tuple[Any, ...]) -> int | None:
        """:meth:`append` for a row in the stored layout
        (:func:`~servekit.usage.record_codec.make_row`, time an ISO-8601 UTC string)."""
        return await self._group.append(row)

    def append_now(self, record: UsageRecord) -> int | None:
        """:meth:`append` at once, outside the event loop's turn (a request ending early)."""
        return self.outbox.append(record)

    def append_row_now(self, row: tuple[Any, ...]) -> int | None:
        """:meth:`append_now` for a row in the stored layout."""
        return self.outbox.append_rows([row])[0]

    def mark_sent(self, row: int | None, final_chunk_sent: bool) -> None:
        """The response ended; whether its final chunk reached the client."""
        self.outbox.mark_sent(row, final_chunk_sent=final_chunk_sent)

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


class _GroupCommit:
    """Appends the rows of requests that finish in the same event-loop turn in one
    transaction: the first caller yields one turn for the others to join, then commits them
    all and goes on at once; the others wait on bare asyncio futures (an :class:`anyio.Event`
    and a checkpoint per group cost more than the grouping saves at one record per turn).

    A caller cancelled while it waits still has its row committed, and the commit marks that
    row as ended without its final chunk (the caller never learns its row id). Off asyncio
    (trio) each row is committed at once."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._rows: list[tuple[Any, ...]] = []
        self._waiters: list[asyncio.Future[int | None]] = []

    async def append(self, row: tuple[Any, ...]) -> int | None:
        """Store ``row`` durably (see :meth:`Outbox.append_rows`); its row id."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio
            return self.outbox.append_rows([row])[0]
        if self._rows:  # a group is open: join it
            waiter: asyncio.Future[int | None] = loop.create_future()
            self._rows.append(row)
            self._waiters.append(waiter)
            try:
                return await waiter
            except BaseException:
                # cancelled after the commit set its id (a plain task.cancel() lands before
                # the caller runs again): the caller never learns the id, so mark it here (a
                # waiter cancelled before the commit is marked by _commit)
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self.outbox.mark_sent(waiter.result(), final_chunk_sent=False)
                raise
        self._rows.append(row)
        try:
            await asyncio.sleep(0)  # one turn: the requests finishing in this one join
        except BaseException:  # cancelled: the group is committed all the same
            try:
                ids = self._commit()
            except Exception:  # the followers got the error; this caller is going away
                log.exception("usage outbox: a group commit failed")
            else:
                self.outbox.mark_sent(ids[0], final_chunk_sent=False)
            raise
        return self._commit()[0]

    def _commit(self) -> list[int | None]:
        """Commit the open group (the first row is the caller's) and resolve the others'
        futures; the row ids. An error is raised, and set on every other future."""
        rows, waiters = self._rows, self._waiters
        self._rows, self._waiters = [], []
        try:
            ids = self.outbox.append_rows(rows)
        except Exception as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            raise
        for row_id, waiter in zip(ids[1:], waiters, strict=True):
            if waiter.done():  # its caller was cancelled: the row never had a final chunk
                self.outbox.mark_sent(row_id, final_chunk_sent=False)
            else:
                waiter.set_result(row_id)
        return ids
