"""The durable local outbox: usage records wait here until every sink has committed them.

A SQLite database in WAL mode with ``synchronous=NORMAL``: a commit is a write to the WAL, not
an fsync, so an append survives a killed process (not a power cut) for tens of microseconds.
No connection checkpoints on its own (``wal_autocheckpoint=0``): the sink workers do, after
each :meth:`ack`, so the serving path never stalls milliseconds copying the WAL back.
The serving path calls :meth:`Outbox.append` before the final chunk is sent and
:meth:`Outbox.mark_sent` after; marks are buffered in memory and committed by the sink
worker's next :meth:`take`, so the serving path pays one INSERT per record. A row whose mark
died with its process (never made, or made within a worker interval of the crash) stays
*unconfirmed* (``final_chunk_sent`` False) and is delivered as such by the next process.

Sinks drain it through :meth:`take` (a batch of rows this sink has not acknowledged) and
:meth:`ack` (after the sink committed): a row is deleted once every sink acknowledged it, so a
crash between a sink's commit and the ack redelivers the batch, which sinks absorb
(idempotent on ``idempotency_key``).

Bounded by rows and age: past either bound the outbox says so loudly (log + :meth:`stats`) and,
by policy, stops admitting requests (fail-closed: :meth:`admitting` is False) or keeps serving
and drops new records, counting them (fail-open).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attrs import frozen

from servekit.usage.record_codec import COLUMNS, from_row, stored_row
from servekit.usage.sink import UsageRecord

log = logging.getLogger("servekit.usage")

# Records are stored as columns in COLUMNS order (no JSON to encode per request); ``state``
# says what the serving path knows: appended (the final chunk not yet sent), sent, or ended
# without the final chunk. ``user_version`` marks this layout.
_LAYOUT = 2
_TABLES = f"""
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, epoch TEXT NOT NULL, created REAL NOT NULL,
    state INTEGER NOT NULL DEFAULT 0, {", ".join(COLUMNS)});
CREATE TABLE IF NOT EXISTS delivered (
    id INTEGER NOT NULL, sink TEXT NOT NULL, PRIMARY KEY (id, sink)) WITHOUT ROWID;
"""
_SCHEMA = f"{_TABLES}PRAGMA user_version = {_LAYOUT};\n"
_APPENDED, _SENT, _UNSENT = 0, 1, 2
_INSERT = (f"INSERT INTO outbox (epoch, created, {', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})")
_FINAL = COLUMNS.index("final_chunk_sent")
_REQUEST_ID = COLUMNS.index("request_id")
# what take() reads: the stored columns, final_chunk_sent from what the serving path knew
_DELIVERED = ", ".join(f"state = {_SENT}" if c == "final_chunk_sent" else c for c in COLUMNS)


@frozen(slots=True)
class OutboxStats:
    """The outbox's state for logs and metrics."""

    backlog: int
    dropped: int
    oldest_age_s: float
    over_bound: bool


class Batch:
    """Rows taken for one sink: outbox row ids and their rows, in the same order.

    ``rows`` are in the stored layout (:func:`~servekit.usage.record_codec.stored_row`: time
    an ISO-8601 UTC string, the flags 0 / 1), what a sink's ``write_rows`` takes;
    ``records`` builds the :class:`UsageRecord` of each (for a sink's ``write``)."""

    __slots__ = ("_records", "ids", "rows")

    def __init__(self, ids: tuple[int, ...], rows: Sequence[tuple[Any, ...]]) -> None:
        self.ids = ids
        self.rows = rows
        self._records: tuple[UsageRecord, ...] | None = None

    @property
    def records(self) -> tuple[UsageRecord, ...]:
        """The rows as records."""
        if self._records is None:
            self._records = tuple(from_row(r) for r in self.rows)
        return self._records


class Outbox:
    """A SQLite-backed outbox at ``path`` shared by the sinks named in ``sinks``.

    ``max_rows`` / ``max_age_s`` bound it; ``fail_open`` picks what happens past the bound.
    Thread-safe: each thread gets its own connection (the serving loop appends, sink workers
    take and ack).
    """

    def __init__(self, path: str | Path, sinks: Sequence[str], *, max_rows: int = 1_000_000,
                 max_age_s: float = 7 * 86400.0, fail_open: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        if not sinks:
            raise ValueError("sinks must name at least one sink")
        if max_rows < 1 or max_age_s <= 0:
            raise ValueError(f"max_rows and max_age_s must be > 0, got {max_rows}, {max_age_s}")
        self.path = Path(path)
        self.sinks = tuple(sinks)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.fail_open = fail_open
        self._clock = clock
        self._epoch = uuid.uuid4().hex
        self._local = threading.local()
        self._lock = threading.Lock()
        self._marks: list[int] = []
        self._dropped = 0
        self._over = False
        self._oldest: float | None = None
        db = self._db()
        layout = db.execute("PRAGMA user_version").fetchone()[0]
        if layout not in (0, _LAYOUT):
            raise RuntimeError(f"{self.path} is a usage outbox of another layout ({layout}, this "
                               f"servekit writes {_LAYOUT}): drain it with that version first")
        _migrate_json_payloads(db)  # by its columns: a file's user_version may be wrong
        db.executescript(_SCHEMA)
        self._backlog = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        self._refresh_oldest(db)

    # -- the serving path ---------------------------------------------------------------------

    def append(self, record: UsageRecord) -> int | None:
        """Store ``record`` durably (unconfirmed); its row id, or None if dropped (fail-open,
        over the bound)."""
        return self.append_rows([stored_row(record)])[0]

    def append_many(self, records: Sequence[UsageRecord]) -> list[int | None]:
        """:meth:`append` for several records in one transaction (a group commit)."""
        return self.append_rows([stored_row(r) for r in records])

    def append_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int | None]:
        """:meth:`append_many` for rows already in the stored layout
        (:func:`~servekit.usage.record_codec.stored_row`; the server's serving path builds
        them directly): one transaction; their row ids (all None: dropped, fail-open)."""
        if not rows:
            return []
        if self._check_bound() and self.fail_open:
            with self._lock:
                self._dropped += len(rows)
                dropped = self._dropped
            log.error("usage outbox over its bound: dropped the record of %s (fail-open; %d "
                      "dropped so far)", ", ".join(str(r[_REQUEST_ID]) for r in rows), dropped)
            return [None] * len(rows)
        head = (self._epoch, self._clock())
        db = self._db()
        if len(rows) == 1:  # one statement is its own transaction: no BEGIN / COMMIT calls
            ids: list[int | None] = [db.execute(_INSERT, head + tuple(rows[0])).lastrowid]
        else:
            with _transaction(db):
                db.executemany(_INSERT, [head + tuple(row) for row in rows])
                last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            # the only writer inside its transaction: SQLite numbered the rows max(id) + 1, ...
            ids = list(range(last - len(rows) + 1, last + 1))
        with self._lock:
            self._backlog += len(rows)
            if self._oldest is None:
                self._oldest = head[1]
        return ids

    def mark_sent(self, row_id: int | None, final_chunk_sent: bool = True) -> None:
        """The request finished: its row is ready to deliver (``final_chunk_sent`` says whether
        the client got the end). Committed by the next take (or :meth:`flush`)."""
        if row_id is None:
            return
        with self._lock:
            self._marks.append(row_id if final_chunk_sent else -row_id)

    def flush(self) -> None:
        """Commit buffered marks now."""
        db = self._db()
        with _transaction(db):
            self._flush_marks(db)

    def admitting(self) -> bool:
        """False when fail-closed and over the bound: the server should refuse new requests."""
        return self.fail_open or not self._check_bound()

    def stats(self) -> OutboxStats:
        """Backlog, drops, the oldest row's age and whether the outbox is over its bound."""
        over = self._check_bound()
        with self._lock:
            age = 0.0 if self._oldest is None else max(0.0, self._clock() - self._oldest)
            return OutboxStats(self._backlog, self._dropped, age, over)

    # -- the sink workers ---------------------------------------------------------------------

    def take(self, sink: str, limit: int = 1000) -> Batch:
        """Up to ``limit`` ready rows ``sink`` has not acknowledged, oldest first: confirmed
        rows, and every row a previous process left behind."""
        self._check_sink(sink)
        db = self._db()
        with _transaction(db):
            self._flush_marks(db)
        rows = db.execute(
            f"SELECT id, {_DELIVERED} FROM outbox o WHERE (state != {_APPENDED} OR epoch != ?) "
            "AND NOT EXISTS (SELECT 1 FROM delivered d WHERE d.id = o.id AND d.sink = ?) "
            "ORDER BY id LIMIT ?", (self._epoch, sink, limit)).fetchall()
        return Batch(tuple(r[0] for r in rows), [r[1:] for r in rows])

    def ack(self, sink: str, ids: Sequence[int]) -> None:
        """``sink`` committed these rows; delete those every sink has now acknowledged."""
        self._check_sink(sink)
        if not ids:
            return
        db = self._db()
        deleted = 0
        if len(self.sinks) == 1:  # acknowledged by every sink: no delivered rows to keep
            with _transaction(db):
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start:start + 500])
                    deleted += db.execute(f"DELETE FROM outbox WHERE id IN "
                                          f"({','.join('?' * len(chunk))})", chunk).rowcount
        else:
            deleted = self._ack_shared(db, sink, ids)
        if deleted:
            with self._lock:
                self._backlog -= deleted
            self._refresh_oldest(db)
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _ack_shared(self, db: sqlite3.Connection, sink: str, ids: Sequence[int]) -> int:
        """Record ``sink``'s acks; delete the rows every sink acknowledged; how many."""
        marks = ",".join("?" * len(self.sinks))
        deleted = 0
        with _transaction(db):
            db.executemany("INSERT OR IGNORE INTO delivered (id, sink) VALUES (?, ?)",
                           [(i, sink) for i in ids])
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                inq = ",".join("?" * len(chunk))
                done = [r[0] for r in db.execute(
                    f"SELECT id FROM delivered WHERE id IN ({inq}) AND sink IN ({marks}) "
                    f"GROUP BY id HAVING count(*) >= ?", [*chunk, *self.sinks, len(self.sinks)])]
                if done:
                    dq = ",".join("?" * len(done))
                    deleted += db.execute(f"DELETE FROM outbox WHERE id IN ({dq})", done).rowcount
                    db.execute(f"DELETE FROM delivered WHERE id IN ({dq})", done)
        return deleted

    def close(self) -> None:
        """Commit buffered marks and close this thread's connection."""
        self.flush()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            db.close()
            self._local.db = None

    # -- internals ----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit: a lone INSERT commits itself; longer work runs in _transaction
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
            self._local.db = db
        return db

    def _flush_marks(self, db: sqlite3.Connection) -> None:
        with self._lock:
            marks, self._marks = self._marks, []
        if marks:
            db.executemany("UPDATE outbox SET state = ? WHERE id = ?",
                           [(_SENT if m > 0 else _UNSENT, abs(m)) for m in marks])

    def _refresh_oldest(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        with self._lock:
            self._oldest = None if row is None else float(row[0])

    def _check_bound(self) -> bool:
        now = self._clock()
        with self._lock:
            too_old = self._oldest is not None and now - self._oldest > self.max_age_s
            over = self._backlog >= self.max_rows or too_old
            changed, self._over = over != self._over, over
            backlog = self._backlog
        if changed and over:
            log.error("usage outbox over its bound (%d rows, max %d; max age %.0fs): %s",
                      backlog, self.max_rows, self.max_age_s,
                      "dropping new records (fail-open)" if self.fail_open
                      else "refusing new requests (fail-closed)")
        elif changed:
            log.warning("usage outbox back under its bound (%d rows)", backlog)
        return over

    def _check_sink(self, sink: str) -> None:
        if sink not in self.sinks:
            raise ValueError(f"sink {sink!r} is not one of this outbox's sinks {self.sinks}")


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction on an autocommit connection: committed, or rolled back on error."""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate_json_payloads(db: sqlite3.Connection) -> None:
    """Rewrite an outbox of the first layout (each record a JSON array in ``payload``, a
    ``confirmed`` flag) into columns, keeping row ids and what each mark said."""
    names = [r[1] for r in db.execute("PRAGMA table_info(outbox)")]
    if "payload" not in names:
        return
    old = db.execute("SELECT id, epoch, created, confirmed, payload FROM outbox").fetchall()
    with _transaction(db):
        db.execute("DROP TABLE outbox")
        for statement in _TABLES.split(";"):  # not executescript: it would commit midway
            if statement.strip():
                db.execute(statement)
        for row_id, epoch, created, confirmed, payload in old:
            values = json.loads(payload)
            state = _APPENDED if not confirmed else (_SENT if values[_FINAL] else _UNSENT)
            db.execute(f"INSERT INTO outbox (id, epoch, created, state, {', '.join(COLUMNS)}) "
                       f"VALUES ({', '.join('?' * (len(COLUMNS) + 4))})",
                       (row_id, epoch, created, state, *values))
