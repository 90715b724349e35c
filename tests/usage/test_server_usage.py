"""The server's usage path end to end: a real ``servekit serve`` (fake engine) killed with
SIGKILL mid-load, restarted on the same data directory; real PostgreSQL and ClickHouse
(chDB behind ClickHouse's HTTP interface) as sinks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from servekit.usage import Outbox, SinkWorker, UsageRecord, open_sink, sink_name
from tests.usage.servers import Postgres, free_port

KEYS = [{"key": f"sk-test-{i}", "tenant": f"tenant-{i % 2}"} for i in range(3)]


def _serve(port: int, data: Path, urls: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "servekit.server.cli", "serve", "--fake",
            "--fake-token-delay", "0.002", "--port", str(port), "--data-dir", str(data),
            "--log-level", "warning"]
    for url in urls:
        argv += ["--usage", url]
    env = {**os.environ, "SERVEKIT_API_KEYS": json.dumps(KEYS)}
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "the server exited at startup"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


async def _load(base: str, n: int, got: dict[str, tuple[int, int]], started: list[int]) -> None:
    """``n`` streamed requests from several keys, 32 at a time; ``got`` collects
    request id -> (prompt, completion) for every response whose final usage chunk arrived."""
    limit = anyio.Semaphore(32)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with limit:
            started[0] += 1
            body = {"model": "fake", "prompt": "hello " * (8 + i % 5), "max_tokens": 16,
                    "stream": True, "stream_options": {"include_usage": True}}
            headers = {"authorization": f"Bearer {KEYS[i % 3]['key']}"}
            try:
                async with client.stream("POST", f"{base}/v1/completions", json=body,
                                         headers=headers) as resp:
                    usage = None
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage") or usage
                    if usage:
                        got[resp.headers["x-request-id"]] = (usage["prompt_tokens"],
                                                             usage["completion_tokens"])
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass  # the server was killed under this request

    async with httpx.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, client, i)


def _pg_rows(dsn: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return list(conn.execute("SELECT request_id, prompt_tokens, completion_tokens, "
                                 "final_chunk_sent FROM usage"))


def _reset_clickhouse(url: str) -> None:
    sink: Any = open_sink(url)
    for table in ("usage_minute_mv", "usage_minute", "usage"):
        sink.backend.command(f"DROP TABLE IF EXISTS {table}")
    sink.close()


@pytest.mark.slow
def test_sigkill_mid_load_loses_and_doubles_nothing(postgres: Postgres,
                                                    clickhouse_url: str) -> None:
    postgres.reset()
    _reset_clickhouse(clickhouse_url)
    data = Path(tempfile.mkdtemp(prefix="servekit-usage-srv-"))
    urls = [postgres.dsn, clickhouse_url]
    port = free_port()
    proc = _serve(port, data, urls)
    got: dict[str, tuple[int, int]] = {}
    started = [0]

    async def load_then_kill() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_load, f"http://127.0.0.1:{port}", 400, got, started)
            while len(got) < 150:
                await anyio.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)

    anyio.run(load_then_kill)
    proc.wait()
    assert 150 <= len(got) < 400, "the kill should land mid-load"
    proc = _serve(port, data, urls)  # the restart drains what the dead process left
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = _pg_rows(postgres.dsn)
            if {r[0] for r in rows} >= set(got):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # let the ClickHouse worker finish its share
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    rows = _pg_rows(postgres.dsn)
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a request was counted twice"
    by_id = {r[0]: (r[1], r[2]) for r in rows}
    missing = sorted(set(got) - set(by_id))
    assert not missing, f"{len(missing)} delivered requests missing from PostgreSQL"
    assert all(by_id[i] == got[i] for i in got), "PostgreSQL numbers differ from the client's"
    assert len(rows) <= started[0]
    lo, hi = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    pg: Any = open_sink(postgres.dsn)
    ch: Any = open_sink(clickhouse_url)
    try:
        assert ch.totals(lo, hi, ["tenant"]) == pg.totals(lo, hi, ["tenant"])
        assert pg.totals(lo, hi, [])[0][0] == len(rows)
    finally:
        pg.close()
        ch.close()


def _record(i: int) -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", idempotency_key=f"k{i}", time=datetime.now(UTC),
                       key_id="kid", tenant="t", model="m", prompt_tokens=i,
                       completion_tokens=1)


def test_worker_killed_between_commit_and_delete_redelivers_once(postgres: Postgres,
                                                                  tmp_path: Path) -> None:
    """A worker that committed to PostgreSQL but died before deleting the rows: the next
    process redelivers them and PostgreSQL still holds each record once."""
    postgres.reset()
    name = sink_name(postgres.dsn)
    box = Outbox(tmp_path / "o.db", [name])
    for i in range(50):
        box.mark_sent(box.append(_record(i)))
    sink = open_sink(postgres.dsn)
    batch = box.take(name, 30)
    sink.write(batch.records)  # committed ... and the worker dies before box.ack
    sink.close()
    del box
    again = Outbox(tmp_path / "o.db", [name])
    assert SinkWorker(again, name, open_sink(postgres.dsn)).drain() == 50
    rows = _pg_rows(postgres.dsn)
    assert sorted(r[0] for r in rows) == sorted(f"r{i}" for i in range(50))
    assert again.stats().backlog == 0


def test_records_wait_while_postgres_is_down(postgres: Postgres, tmp_path: Path) -> None:
    """PostgreSQL stopped: records stay in the outbox; it comes back: they arrive."""
    postgres.reset()
    name = sink_name(postgres.dsn)
    box = Outbox(tmp_path / "o.db", [name])
    worker = SinkWorker(box, name, open_sink(postgres.dsn), interval_s=0.05, max_backoff_s=0.2)
    worker.start()
    try:
        postgres.stop()
        try:
            for i in range(20):
                box.mark_sent(box.append(_record(i)))
            time.sleep(1.0)
            assert box.stats().backlog == 20 and worker.failures > 0
        finally:
            postgres.start()
        deadline = time.monotonic() + 30
        while box.stats().backlog and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
    assert box.stats().backlog == 0
    assert sorted(r[0] for r in _pg_rows(postgres.dsn)) == sorted(f"r{i}" for i in range(20))
