"""Every built-in sink passes the usage-sink kit against real storage, and reports totals."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from servekit.testing import UsageSinkContract
from servekit.usage import UsageRecord, open_sink
from servekit.usage.sinks.clickhouse import ClickHouseSink, chdb_local
from servekit.usage.sinks.sqlite import SQLiteSink
from tests.usage.servers import Postgres


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="servekit-usage-"))


class TestSQLiteSink(UsageSinkContract):
    sink_factory = staticmethod(lambda: SQLiteSink(_tmp() / "usage.db"))

    def stored(self, sink: Any) -> list[UsageRecord]:
        return sink.read_all()  # type: ignore[no-any-return]


class TestChdbSink(UsageSinkContract):
    max_examples: ClassVar[int] = 8
    sink_factory = staticmethod(lambda: ClickHouseSink(chdb_local(_tmp() / "chdb")))

    def stored(self, sink: Any) -> list[UsageRecord]:
        return sink.read_all()  # type: ignore[no-any-return]


class TestPostgresSink(UsageSinkContract):
    max_examples: ClassVar[int] = 15

    @pytest.fixture(autouse=True)
    def _server(self, postgres: Postgres) -> None:
        self.server = postgres

    def make_sink(self) -> Any:
        from servekit.usage.sinks.postgres import PostgresSink

        self.server.reset()
        return PostgresSink(self.server.dsn)

    def stored(self, sink: Any) -> list[UsageRecord]:
        return sink.read_all()  # type: ignore[no-any-return]


def _records(n: int) -> list[UsageRecord]:
    day = datetime(2026, 3, 1, 12, tzinfo=UTC)
    return [UsageRecord(request_id=f"r{i}", idempotency_key=f"k{i}",
                        time=day + timedelta(hours=13 * i), key_id=f"kid{i % 2}",
                        tenant=("acme", "zeta")[i % 2], model="m", prompt_tokens=10 + i,
                        cached_tokens=i, completion_tokens=2 * i, final_chunk_sent=True,
                        ledger=i != 5)
            for i in range(n)]


def _expected(by_tenant: bool) -> list[tuple[Any, ...]]:
    out: dict[Any, list[int]] = {}
    for r in _records(8):
        if not r.ledger:
            continue
        key = r.tenant if by_tenant else None
        acc = out.setdefault(key, [0, 0, 0, 0])
        for i, v in enumerate((1, r.prompt_tokens, r.cached_tokens, r.completion_tokens)):
            acc[i] += v
    return [((k,) if by_tenant else ()) + tuple(v) for k, v in sorted(out.items())]


@pytest.mark.parametrize("kind", ["sqlite", "chdb", "postgres"])
def test_totals_agree_across_sinks(kind: str, request: pytest.FixtureRequest) -> None:
    """Totals by tenant (ledger records only) are the same numbers in every sink."""
    if kind == "postgres":
        pg = request.getfixturevalue("postgres")
        pg.reset()
        url = pg.dsn
    else:
        url = f"{kind}:///{_tmp()}/{'usage.db' if kind == 'sqlite' else 'ch'}"
    sink: Any = open_sink(url)
    try:
        sink.write(_records(8))
        sink.write(_records(8)[2:5])  # redelivery
        lo, hi = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
        assert sink.totals(lo, hi, ["tenant"]) == _expected(True)
        assert sink.totals(lo, hi, []) == _expected(False)
        days = sink.totals(lo, hi, ["day"])
        assert [d[0] for d in days] == sorted({r.time.date().isoformat() for r in _records(8)
                                                if r.ledger})
    finally:
        sink.close()


class TestClickHouseHTTPSink(UsageSinkContract):
    """clickhouse-connect over HTTP, against chDB serving ClickHouse's HTTP interface."""

    max_examples: ClassVar[int] = 8

    @pytest.fixture(autouse=True)
    def _server(self, clickhouse_url: str) -> None:
        self.url = clickhouse_url

    def make_sink(self) -> Any:
        sink = open_sink(self.url)
        for table in ("usage_minute_mv", "usage_minute", "usage"):
            sink.backend.command(f"DROP TABLE IF EXISTS {table}")  # type: ignore[attr-defined]
        return open_sink(self.url)

    def stored(self, sink: Any) -> list[UsageRecord]:
        return sink.read_all()  # type: ignore[no-any-return]


def test_clickhouse_retried_insert_is_dropped_by_its_token(clickhouse_url: str) -> None:
    """An insert retried with the same deduplication token (its reply was lost) is not stored
    twice, and the per-minute rollup counts it once."""
    from servekit.usage.sinks.clickhouse import _ch_row

    sink: Any = open_sink(clickhouse_url)
    for table in ("usage_minute_mv", "usage_minute", "usage"):
        sink.backend.command(f"DROP TABLE IF EXISTS {table}")
    sink = open_sink(clickhouse_url)
    rows = [_ch_row(r) for r in _records(3)]
    sink.backend.insert(rows, "token-1")
    sink.backend.insert(rows, "token-1")  # the server drops the retry
    assert len(sink.read_all()) == 3
    assert sink.backend.rows("SELECT sum(requests) FROM usage_minute")[0][0] in (3, "3")
    sink.close()
