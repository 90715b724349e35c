"""The usage-sink kit: an idempotent SQLite sink passes; a sink that double counts fails."""

from __future__ import annotations

import pickle
import sqlite3
from collections.abc import Iterable, Sequence

import pytest

from servekit.testing import InvariantViolationError
from servekit.testing.usage import UsageSinkContract, usage_sink_contract
from servekit.usage.sink import UsageRecord


class SQLiteSink:
    """A minimal sink: one row per idempotency key (INSERT OR IGNORE), in one transaction."""

    def __init__(self, unique: bool = True) -> None:
        self.db = sqlite3.connect(":memory:")
        constraint = "PRIMARY KEY" if unique else ""
        self.db.execute(f"CREATE TABLE usage (key TEXT {constraint}, record BLOB)")
        self.verb = "INSERT OR IGNORE" if unique else "INSERT"

    def write(self, batch: Sequence[UsageRecord]) -> None:
        with self.db:
            self.db.executemany(f"{self.verb} INTO usage VALUES (?, ?)",
                                [(r.idempotency_key, pickle.dumps(r)) for r in batch])

    def close(self) -> None:
        self.db.close()

    def read(self) -> list[UsageRecord]:
        return [pickle.loads(blob) for (blob,) in self.db.execute("SELECT record FROM usage")]


class TestSQLiteSink(UsageSinkContract):
    sink_factory = SQLiteSink

    def stored(self, sink: SQLiteSink) -> Iterable[UsageRecord]:  # type: ignore[override]
        return sink.read()


class LastWriteWinsSink(SQLiteSink):
    """Planted bug: a rewrite replaces the stored record (INSERT OR REPLACE)."""

    def __init__(self) -> None:
        super().__init__()
        self.verb = "INSERT OR REPLACE"


def test_double_counting_sink_fails() -> None:
    kit = usage_sink_contract(lambda: SQLiteSink(unique=False), SQLiteSink.read)()
    with pytest.raises(InvariantViolationError, match="a batch written twice is counted once"):
        kit.test_batch_written_twice_is_counted_once()


def test_last_write_wins_sink_fails() -> None:
    kit = usage_sink_contract(LastWriteWinsSink, SQLiteSink.read)()
    with pytest.raises(InvariantViolationError, match="a rewrite changes nothing"):
        kit.test_batch_written_twice_is_counted_once()
