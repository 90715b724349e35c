"""The embedded default sink: a SQLite table keyed by ``idempotency_key``."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servekit.usage.record_codec import COLUMNS, from_row, stored_row, totals_sql
from servekit.usage.sink import UsageRecord

_COLUMN_TYPES = {
    "idempotency_key": "TEXT PRIMARY KEY", "request_id": "TEXT NOT NULL", "time": "TEXT NOT NULL",
    "key_id": "TEXT", "tenant": "TEXT", "model": "TEXT NOT NULL", "replicas": "TEXT NOT NULL",
    "prompt_tokens": "INTEGER NOT NULL", "cached_tokens": "INTEGER NOT NULL",
    "completion_tokens": "INTEGER NOT NULL", "finish_reason": "TEXT",
    "http_status": "INTEGER NOT NULL", "queue_time": "REAL", "ttft": "REAL",
    "total_time": "REAL NOT NULL", "final_chunk_sent": "INTEGER NOT NULL",
    "ledger": "INTEGER NOT NULL",
}
_INSERT = (f"INSERT OR IGNORE INTO usage ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(COLUMNS))})")


class SQLiteSink:
    """Usage records in the ``usage`` table of the SQLite database at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        columns = ", ".join(f"{c} {_COLUMN_TYPES[c]}" for c in COLUMNS)
        with self._db:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS usage ({columns})")
            self._db.execute("CREATE INDEX IF NOT EXISTS usage_time ON usage (time)")

    def write(self, batch: Sequence[UsageRecord]) -> None:
        """Commit ``batch``; records whose key is already stored are skipped."""
        self.write_rows([stored_row(r) for r in batch])

    def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """:meth:`write` for rows in the outbox's stored layout (the layout of this table)."""
        with self._db:
            self._db.executemany(_INSERT, rows)

    def read_all(self) -> list[UsageRecord]:
        """Every stored record."""
        return [from_row(r) for r in self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM usage")]

    def totals(self, start: datetime, end: datetime, by: Sequence[str]) -> list[tuple[object, ...]]:
        """Sums of requests and tokens grouped by ``by`` (tenant, key_id, model, day)."""
        sql = totals_sql(by, "substr(time, 1, 10)", "count(*)",
                         "time >= ? AND time < ? AND ledger = 1")
        return [tuple(r) for r in self._db.execute(
            sql, (start.astimezone(UTC).isoformat(), end.astimezone(UTC).isoformat()))]

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

