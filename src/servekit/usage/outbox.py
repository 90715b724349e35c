"""The durable local outbox: usage records wait here until every sink has committed them.

Two parts. The serving path appends to this process's **append log**
(:mod:`servekit.usage.append_log`: a store into a memory-mapped file, ~1 us, durable against a
killed process once it returns, not a power cut) before the final chunk is sent, and appends
the record's mark (final chunk sent or not) after. The sink workers **fold** the log into a
SQLite table (WAL, ``synchronous=NORMAL``) in batches, one transaction per fold that also
stores how far the log was read, so a row is folded once; a row folded with its mark is ready
to deliver, a mark that comes later updates it. A log whose process died is adopted by the
next :class:`Outbox` opened on the same file (its rows, with the marks it holds; a row that
never got its mark stays *unconfirmed*, ``final_chunk_sent`` False).

Row ids are the log's number (handed out by the table, so processes sharing an outbox never
collide) times 2**40 plus the row's sequence in its log. No connection checkpoints on its own
(``wal_autocheckpoint=0``): the sink workers do, after each :meth:`ack`.

Sinks drain the table through :meth:`take` (a batch of rows this sink has not acknowledged) and
:meth:`ack` (after the sink committed): a row is deleted once every sink acknowledged it, so a
crash between a sink's commit and the ack redelivers the batch, which sinks absorb
(idempotent on ``idempotency_key``).

Bounded by rows and age: past either bound the outbox says so loudly (log + :meth:`stats`) and,
by policy, stops admitting requests (fail-closed: :meth:`admitting` is False) or keeps serving
and drops new records, counting them (fail-open).
"""

from __future__ import annotations

import itertools
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

from servekit.usage.append_log import (
    AppendLog,
    LogPosition,
    adoptable,
    read_entries,
    release_segments,
    remove_log,
)
from servekit.usage.record_codec import COLUMNS, from_row, stored_row
from servekit.usage.sink import UsageRecord

log = logging.getLogger("servekit.usage")

# Records are stored as columns in COLUMNS order (no JSON to encode per request); ``state``
# says what the serving path knows: appended (the final chunk not yet sent), sent, or ended
# without the final chunk. ``append_logs``: each process's log, its epoch and how far it was
# folded (AUTOINCREMENT: a number is never handed out twice, so row ids never repeat).
# ``user_version`` marks this layout (3: rows arrive through append logs; a layout-2
# file is upgraded in place, an older servekit refuses a layout-3 one instead of missing the
# rows still in its logs).
_LAYOUT = 3
_TABLES = f"""
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, epoch TEXT NOT NULL, created REAL NOT NULL,
    state INTEGER NOT NULL DEFAULT 0, {", ".join(COLUMNS)});
CREATE TABLE IF NOT EXISTS delivered (
    id INTEGER NOT NULL, sink TEXT NOT NULL, PRIMARY KEY (id, sink)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS append_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, epoch TEXT NOT NULL,
    segment INTEGER NOT NULL DEFAULT 0, offset INTEGER NOT NULL DEFAULT 0);
"""
_SCHEMA = f"{_TABLES}PRAGMA user_version = {_LAYOUT};\n"
_APPENDED, _SENT, _UNSENT = 0, 1, 2
_INSERT = (f"INSERT OR IGNORE INTO outbox (id, epoch, created, state, {', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' * (len(COLUMNS) + 4))})")
_ID_BITS = 40  # a row id is its log's number << _ID_BITS | its sequence in that log
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
    """A SQLite-backed outbox at ``path`` shared by the sinks named in ``sinks``, with this
    process's append log in the directory ``<path>.appends``.

    ``max_rows`` / ``max_age_s`` bound it; ``fail_open`` picks what happens past the bound;
    ``log_segment_bytes`` sizes the log's segment files (allocated up front). Thread-safe:
    each thread gets its own connection (the serving loop appends, sink workers fold, take
    and ack). One per process: open a new one after ``fork``. The logs of processes that
    died are adopted when an outbox opens and every ``adopt_every_s`` seconds of takes after.
    """

    #: How often :meth:`take` looks for the logs of processes that died (a sibling front end
    #: sharing this outbox, killed and not restarted).
    adopt_every_s = 10.0

    def __init__(self, path: str | Path, sinks: Sequence[str], *, max_rows: int = 1_000_000,
                 max_age_s: float = 7 * 86400.0, fail_open: bool = False,
                 clock: Callable[[], float] = time.time,
                 log_segment_bytes: int = 4 << 20) -> None:
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
        self._fold_lock = threading.Lock()
        self._dropped = 0
        self._over = False
        self._oldest: float | None = None
        self._logs = Path(f"{self.path}.appends")
        db = self._db()
        layout = db.execute("PRAGMA user_version").fetchone()[0]
        if layout not in (0, 2, _LAYOUT):
            raise RuntimeError(f"{self.path} is a usage outbox of another layout ({layout}, this "
                               f"servekit writes {_LAYOUT}): drain it with that version first")
        _migrate_json_payloads(db)  # by its columns: a file's user_version may be wrong
        db.executescript(_SCHEMA)
        self._adopt_dead_logs(db)
        self._adopted_at = time.monotonic()
        self._number: int = db.execute("INSERT INTO append_logs (epoch) VALUES (?)",
                                       (self._epoch,)).lastrowid or 0
        self._base = self._number << _ID_BITS
        self._seq = itertools.count(1)
        self._folded: LogPosition = (0, 0)
        self._log = AppendLog(self._logs, self._number, segment_bytes=log_segment_bytes)
        self._backlog = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        self._refresh_oldest(db)

    # -- the serving path ---------------------------------------------------------------------

    def append(self, record: UsageRecord) -> int | None:
        """Store ``record`` durably (unconfirmed); its row id, or None if dropped (fail-open,
        over the bound)."""
        return self.append_rows([stored_row(record)])[0]

    def append_many(self, records: Sequence[UsageRecord]) -> list[int | None]:
        """:meth:`append` for several records."""
        return self.append_rows([stored_row(r) for r in records])

    def append_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int | None]:
        """:meth:`append_many` for rows already in the stored layout
        (:func:`~servekit.usage.record_codec.stored_row`; the server's serving path builds
        them directly); their row ids (all None: dropped, fail-open)."""
        if not rows:
            return []
        if self._check_bound() and self.fail_open:
            with self._lock:
                self._dropped += len(rows)
                dropped = self._dropped
            log.error("usage outbox over its bound: dropped the record of %s (fail-open; %d "
                      "dropped so far)", ", ".join(str(r[_REQUEST_ID]) for r in rows), dropped)
            return [None] * len(rows)
        created = self._clock()
        base, seq = self._base, self._seq
        ids: list[int | None] = [base | next(seq) for _ in rows]
        self._log.append([(i, created, *row) for i, row in zip(ids, rows, strict=True)])
        with self._lock:
            self._backlog += len(rows)
            if self._oldest is None:
                self._oldest = created
        return ids

    def mark_sent(self, row_id: int | None, final_chunk_sent: bool = True) -> None:
        """The request finished: its row is ready to deliver (``final_chunk_sent`` says whether
        the client got the end). Durable once this returns, like the row."""
        if row_id is None:
            return
        self._log.append([(row_id, _SENT if final_chunk_sent else _UNSENT)])

    def flush(self) -> None:
        """Fold this process's append log into the table now (the sink workers' :meth:`take`
        does before each batch)."""
        self._fold(self._db())

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
        """Up to ``limit`` ready rows ``sink`` has not acknowledged, oldest first: marked rows,
        and every row of a process whose log was adopted (it died, or closed, before marking
        them). A live process's unmarked rows wait for their marks."""
        self._check_sink(sink)
        db = self._db()
        if time.monotonic() - self._adopted_at >= self.adopt_every_s:
            self._adopted_at = time.monotonic()
            adopted = self._adopt_dead_logs(db)
            if adopted:
                with self._lock:
                    self._backlog += adopted
        self._fold(db)
        rows = db.execute(
            f"SELECT id, {_DELIVERED} FROM outbox o WHERE (state != {_APPENDED} OR epoch NOT "
            "IN (SELECT epoch FROM append_logs)) AND NOT EXISTS (SELECT 1 FROM delivered d "
            "WHERE d.id = o.id AND d.sink = ?) ORDER BY id LIMIT ?", (sink, limit)).fetchall()
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
        """Fold the append log and close this thread's connection (the log stays open: rows
        and marks appended later are folded by the next :meth:`take` or the next process)."""
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
            # autocommit: one statement commits itself; longer work runs in _transaction
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
            self._local.db = db
        return db

    def _fold(self, db: sqlite3.Connection) -> None:
        """Store what this process's log holds past the last fold, in one transaction that
        also records how far it was read."""
        with self._fold_lock:
            entries, position = read_entries(self._logs, self._number, self._folded)
            if not entries:
                return
            with _transaction(db):
                _store(db, self._epoch, entries)
                db.execute("UPDATE append_logs SET segment = ?, offset = ? WHERE id = ?",
                           (*position, self._number))
            if position[0] != self._folded[0]:
                release_segments(self._logs, self._number, position)
            self._folded = position

    def _adopt_dead_logs(self, db: sqlite3.Connection) -> int:
        """Fold the logs of processes that died (or closed) since, then remove them; how
        many rows they added to the table."""
        added = 0
        for number, held in adoptable(self._logs):
            known = db.execute("SELECT epoch, segment, offset FROM append_logs WHERE id = ?",
                               (number,)).fetchone()
            epoch, position = (known[0], (known[1], known[2])) if known else (f"log-{number}",
                                                                                 (0, 0))
            entries, position = read_entries(self._logs, number, position)
            # one transaction; a crash before remove_log reads the log again from its start,
            # which INSERT OR IGNORE absorbs (and sinks absorb a row delivered twice)
            with _transaction(db):
                added += _store(db, epoch, entries)
                db.execute("DELETE FROM append_logs WHERE id = ?", (number,))
            remove_log(self._logs, number, held)
            if entries:
                log.info("usage outbox: adopted %d entries of a previous process's append log "
                         "%d", len(entries), number)
        return added

    def _refresh_oldest(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        with self._lock:
            if row is not None:
                self._oldest = float(row[0])
            else:  # what is left is in the log, appended since the last fold
                self._oldest = self._clock() if self._backlog > 0 else None

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


def _store(db: sqlite3.Connection, epoch: str, entries: list[tuple[Any, ...]]) -> int:
    """Insert an append log's rows (``(id, created, *row)``) with the marks among
    ``entries`` (``(id, state)``, a later one wins); update the rows marked after an earlier
    fold stored them. How many rows were inserted."""
    marks = {e[0]: e[1] for e in entries if len(e) == 2}
    rows = [(e[0], epoch, e[1], marks.pop(e[0], _APPENDED), *e[2:])
            for e in entries if len(e) > 2]
    inserted = db.executemany(_INSERT, rows).rowcount if rows else 0
    if marks:
        db.executemany("UPDATE outbox SET state = ? WHERE id = ?",
                       [(state, row_id) for row_id, state in marks.items()])
    return inserted


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
