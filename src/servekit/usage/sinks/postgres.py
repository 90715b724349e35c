"""The ledger of record: PostgreSQL through psycopg 3.

A batch is ``COPY``-ed into a temporary staging table, then
``INSERT ... SELECT ... ON CONFLICT (idempotency_key) DO NOTHING`` moves it into ``usage``, in
one transaction: a redelivered batch changes nothing. The schema is created and migrated by
:data:`MIGRATIONS` (numbered, applied in order once, recorded in ``servekit_schema``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from servekit._optional import require
from servekit.usage.record_codec import COLUMNS, first_per_key, from_row, to_row, totals_sql
from servekit.usage.sink import UsageRecord

#: Versioned migrations: (version, SQL). Append; never edit a released one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE usage (
    idempotency_key text PRIMARY KEY, request_id text NOT NULL, time timestamptz NOT NULL,
    key_id text, tenant text, model text NOT NULL, replicas text NOT NULL,
    prompt_tokens bigint NOT NULL, cached_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL, finish_reason text, http_status integer NOT NULL,
    queue_time double precision, ttft double precision, total_time double precision NOT NULL,
    final_chunk_sent boolean NOT NULL, ledger boolean NOT NULL);
CREATE INDEX usage_time ON usage (time);
CREATE INDEX usage_tenant_time ON usage (tenant, time);
"""),
)

_COLS = ", ".join(COLUMNS)


class PostgresSink:
    """Usage records in PostgreSQL at ``dsn`` (a ``postgresql://`` URL or a libpq string)."""

    def __init__(self, dsn: str, *, connect_timeout: float = 10.0) -> None:
        self._psycopg = require("psycopg", "usage")
        self.dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: Any = None
        self.migrate()

    def migrate(self) -> int:
        """Apply the migrations this database lacks; the schema version it ends at."""
        conn = self._connection()
        with conn.transaction():
            conn.execute("CREATE TABLE IF NOT EXISTS servekit_schema "
                         "(version integer PRIMARY KEY, applied timestamptz DEFAULT now())")
            conn.execute("LOCK TABLE servekit_schema IN EXCLUSIVE MODE")
            done = {r[0] for r in conn.execute("SELECT version FROM servekit_schema")}
            for version, sql in MIGRATIONS:
                if version not in done:
                    conn.execute(sql)
                    conn.execute("INSERT INTO servekit_schema (version) VALUES (%s)", (version,))
        return max(v for v, _ in MIGRATIONS)

    def write(self, batch: Sequence[UsageRecord]) -> None:
        """Commit ``batch`` (COPY into staging, then insert the keys not yet stored)."""
        if not batch:
            return
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS usage_staging "
                             "(LIKE usage INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                with conn.cursor().copy(f"COPY usage_staging ({_COLS}) FROM STDIN") as copy:
                    for record in first_per_key(batch):
                        copy.write_row(to_row(record))
                conn.execute(f"INSERT INTO usage ({_COLS}) SELECT {_COLS}"
                             f" FROM usage_staging "
                             "ON CONFLICT (idempotency_key) DO NOTHING")
        except self._psycopg.OperationalError:
            self._drop_connection()
            raise

    def read_all(self) -> list[UsageRecord]:
        """Every stored record."""
        conn = self._connection()
        return [from_row(r) for r in conn.execute(f"SELECT {_COLS} FROM usage")]

    def totals(self, start: datetime, end: datetime, by: Sequence[str]) -> list[tuple[Any, ...]]:
        """Sums of requests and tokens grouped by ``by`` (tenant, key_id, model, day)."""
        rows = self._connection().execute(totals_sql(
            by, "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "count(*)",
            "time >= %s AND time < %s AND ledger"), (start, end))
        return [tuple(int(v) if isinstance(v, Decimal) else v for v in r) for r in rows]

    def close(self) -> None:
        """Close the connection."""
        self._drop_connection()

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.dsn, autocommit=True,
                                               connect_timeout=int(self._connect_timeout))
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

