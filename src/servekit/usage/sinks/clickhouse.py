"""Analytics in ClickHouse: over HTTP with clickhouse-connect, or in-process with chDB.

``usage`` is a MergeTree partitioned by month, ordered by (tenant, model, time), with a TTL and
a bloom-filter index on ``idempotency_key``; ``usage_minute`` is a per-minute rollup
(SummingMergeTree) fed by a materialized view. MergeTree does not enforce keys, so a batch is
made idempotent twice over: the keys already stored are skipped (looked up through the index),
and the insert carries a deduplication token derived from its keys, so an insert retried after
a lost response is dropped by the server.

Both backends run the same SQL; only how a statement reaches the engine differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from servekit._optional import require
from servekit.usage.record_codec import COLUMNS, first_per_key, from_row, totals_sql
from servekit.usage.sink import UsageRecord

_TYPES = {
    "idempotency_key": "String", "request_id": "String", "time": "DateTime64(6, 'UTC')",
    "key_id": "String", "tenant": "String", "model": "String", "replicas": "String",
    "prompt_tokens": "UInt32", "cached_tokens": "UInt32", "completion_tokens": "UInt32",
    "finish_reason": "String", "http_status": "UInt16", "queue_time": "Nullable(Float64)",
    "ttft": "Nullable(Float64)", "total_time": "Float64", "final_chunk_sent": "Bool",
    "ledger": "Bool",
}


def schema(ttl_days: int) -> list[str]:
    """The statements that create the tables and the rollup (idempotent)."""
    columns = ", ".join(f"{c} {_TYPES[c]}" for c in COLUMNS)
    ttl = f"TTL toDateTime(time) + INTERVAL {int(ttl_days)} DAY"
    return [
        f"CREATE TABLE IF NOT EXISTS usage ({columns}, "
        "INDEX key_idx idempotency_key TYPE bloom_filter GRANULARITY 1) "
        f"ENGINE = MergeTree PARTITION BY toYYYYMM(time) ORDER BY (tenant, model, time) {ttl} "
        "SETTINGS non_replicated_deduplication_window = 10000",
        "CREATE TABLE IF NOT EXISTS usage_minute (minute DateTime('UTC'), tenant String, "
        "model String, requests UInt64, prompt_tokens UInt64, cached_tokens UInt64, "
        "completion_tokens UInt64) ENGINE = SummingMergeTree PARTITION BY toYYYYMM(minute) "
        f"ORDER BY (tenant, model, minute) TTL minute + INTERVAL {int(ttl_days)} DAY "
        "SETTINGS non_replicated_deduplication_window = 10000",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS usage_minute_mv TO usage_minute AS SELECT "
        "toStartOfMinute(time) AS minute, tenant, model, count() AS requests, "
        "sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens, "
        "sum(completion_tokens) AS completion_tokens FROM usage WHERE ledger "
        "GROUP BY minute, tenant, model",
    ]


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Backend(Protocol):
    """How statements reach ClickHouse."""

    def command(self, sql: str) -> None: ...
    def rows(self, sql: str) -> list[tuple[Any, ...]]: ...
    def insert(self, rows: list[dict[str, Any]], token: str) -> None: ...
    def close(self) -> None: ...


class ClickHouseSink:
    """Usage records in ClickHouse through ``backend`` (see :func:`clickhouse_http`,
    :func:`chdb_local`)."""

    def __init__(self, backend: Backend, *, ttl_days: int = 400) -> None:
        self.backend = backend
        for statement in schema(ttl_days):
            backend.command(statement)

    def write(self, batch: Sequence[UsageRecord]) -> None:
        """Insert the records of ``batch`` whose keys are not stored yet."""
        records = first_per_key(batch)
        if not records:
            return
        keys = ", ".join(quote(r.idempotency_key) for r in records)
        stored = {r[0] for r in self.backend.rows(
            f"SELECT idempotency_key FROM usage WHERE idempotency_key IN ({keys})")}
        fresh = [r for r in records if r.idempotency_key not in stored]
        if not fresh:
            return
        token = hashlib.sha256("\n".join(r.idempotency_key for r in fresh).encode()).hexdigest()
        self.backend.insert([_ch_row(r) for r in fresh], token)

    def read_all(self) -> list[UsageRecord]:
        """Every stored record."""
        return [from_row(r) for r in self.backend.rows(f"SELECT {', '.join(COLUMNS)} FROM usage")]

    def totals(self, start: datetime, end: datetime, by: Sequence[str]) -> list[tuple[Any, ...]]:
        """Sums of requests and tokens grouped by ``by`` (tenant, key_id, model, day)."""
        lo, hi = (quote(_ch_time(t)) for t in (start, end))
        rows = self.backend.rows(totals_sql(
            by, "toString(toDate(time))", "count()",
            f"time >= toDateTime64({lo}, 6, 'UTC') AND time < toDateTime64({hi}, 6, 'UTC') "
            "AND ledger"))
        width = len(by)
        return [tuple([*(v or None for v in r[:width]), *(int(v) for v in r[width:])])
                for r in rows]

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def _insert_settings(token: str) -> dict[str, Any]:
    # the rollup is deduplicated with the same token, or a retried insert would count twice there
    return {"insert_deduplication_token": token,
            "deduplicate_blocks_in_dependent_materialized_views": 1}


def _ch_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _ch_row(record: UsageRecord) -> dict[str, Any]:
    return {
        "idempotency_key": record.idempotency_key, "request_id": record.request_id,
        "time": _ch_time(record.time), "key_id": record.key_id or "",
        "tenant": record.tenant or "", "model": record.model,
        "replicas": ",".join(record.replicas), "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens, "completion_tokens": record.completion_tokens,
        "finish_reason": record.finish_reason or "", "http_status": record.http_status,
        "queue_time": record.queue_time, "ttft": record.ttft, "total_time": record.total_time,
        "final_chunk_sent": record.final_chunk_sent, "ledger": record.ledger,
    }


class _HTTPBackend:
    def __init__(self, client: Any) -> None:
        self.client = client

    def command(self, sql: str) -> None:
        self.client.command(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.client.query(sql).result_rows]

    def insert(self, rows: list[dict[str, Any]], token: str) -> None:
        body = "\n".join(json.dumps(r) for r in rows)
        self.client.raw_insert("usage", list(COLUMNS), body, fmt="JSONEachRow",
                               settings=_insert_settings(token))

    def close(self) -> None:
        self.client.close()


def clickhouse_http(url: str) -> Backend:
    """A clickhouse-connect backend for ``clickhouse://[user[:password]@]host[:port][/db]``
    (HTTP interface, port 8123 by default)."""
    clickhouse_connect = require("clickhouse_connect", "usage")
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    client = clickhouse_connect.get_client(
        host=parts.hostname or "127.0.0.1", port=parts.port or 8123,
        username=parts.username or "default", password=parts.password or "",
        database=parts.path.strip("/") or "default")
    return _HTTPBackend(client)


class _ChdbBackend:
    def __init__(self, path: str | Path) -> None:
        session = require("chdb.session", "usage")
        self.session = session.Session(str(path))

    def command(self, sql: str) -> None:
        self.session.query(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        out = self.session.query(sql, "JSONCompact")
        text = out.bytes().decode() if hasattr(out, "bytes") else str(out)
        return [tuple(r) for r in json.loads(text)["data"]] if text.strip() else []

    def insert(self, rows: list[dict[str, Any]], token: str) -> None:
        body = "\n".join(json.dumps(r) for r in rows)
        settings = ", ".join(f"{k} = {quote(str(v))}" for k, v in _insert_settings(token).items())
        self.session.query(f"INSERT INTO usage ({', '.join(COLUMNS)}) SETTINGS {settings} "
                           f"FORMAT JSONEachRow\n{body}")

    def close(self) -> None:
        self.session.close()


def chdb_local(path: str | Path) -> Backend:
    """An in-process chDB backend storing its data under the directory ``path``."""
    return _ChdbBackend(path)
