"""What a serving tier (``servekit serve`` or ``servekit gateway``) records usage with.

:class:`UsageRecorder` owns the outbox in a data directory, one :class:`SinkWorker` per sink,
and the secret that turns an API key into its ``key_id``. The tier's own call path (the
server's ASGI ``send`` wrapper, the gateway's relay) builds the records and appends them.
"""

from __future__ import annotations

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

    def append(self, record: UsageRecord) -> int | None:
        """Store ``record`` durably before the response's final chunk; its outbox row id
        (None: dropped, fail-open)."""
        return self.outbox.append(record)

    def append_row(self, row: tuple[Any, ...]) -> int | None:
        """:meth:`append` for a row in the stored layout
        (:func:`~servekit.usage.record_codec.make_row`, time an ISO-8601 UTC string)."""
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
