"""The usage call path in process: what a record holds for finished, aborted and refused
requests, the key id, the fail-closed 503, and ``servekit usage``."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from servekit.server.app import create_app
from servekit.server.cli import main
from servekit.server.fake import FakeEngine
from servekit.server.keys import ApiKey, KeyStore
from servekit.server.usage_path import UsageRecorder
from servekit.usage.sinks.sqlite import SQLiteSink
from tests.asgi_server import serve_asgi

SECRET = b"s" * 32


def _app(tmp_path: Path, **kw: Any) -> tuple[Any, UsageRecorder]:
    recorder = UsageRecorder(tmp_path / "data", secret=SECRET, replica="r0", **kw)
    keys = KeyStore([ApiKey(key="sk-a", tenant="acme")])
    return create_app(FakeEngine(token_delay=0.01), keys=keys, usage=recorder), recorder


def _stored(tmp_path: Path) -> list[Any]:
    sink = SQLiteSink(tmp_path / "data" / "usage.db")
    try:
        return sink.read_all()
    finally:
        sink.close()


def test_finished_and_aborted_requests_are_recorded(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    auth = {"authorization": "Bearer sk-a"}
    with serve_asgi(app) as base:
        done = httpx.post(f"{base}/v1/completions", headers={**auth, "idempotency-key": "x1"},
                          json={"model": "fake", "prompt": "a b c", "max_tokens": 4})
        assert done.status_code == 200
        with httpx.stream("POST", f"{base}/v1/completions", headers=auth, timeout=10,
                          json={"model": "fake", "prompt": "a b", "max_tokens": 500,
                                "stream": True}) as resp:
            next(resp.iter_lines())  # read a little, then hang up mid-stream
        aborted_id = resp.headers["x-request-id"]
    records = {r.request_id: r for r in _stored(tmp_path)}  # the lifespan drained on exit
    ok = records[done.headers["x-request-id"]]
    usage = done.json()["usage"]
    assert (ok.prompt_tokens, ok.completion_tokens) == (usage["prompt_tokens"],
                                                        usage["completion_tokens"])
    assert ok.final_chunk_sent and ok.http_status == 200 and ok.tenant == "acme"
    assert ok.key_id == hmac.new(SECRET, b"sk-a", hashlib.sha256).hexdigest()[:32]
    assert ok.idempotency_key == f"{ok.key_id}:x1" and ok.replicas == ("r0",)
    assert "sk-a" not in json.dumps([str(r) for r in records.values()])
    aborted = records[aborted_id]
    assert not aborted.final_chunk_sent and aborted.completion_tokens < 500


def test_fail_closed_outbox_refuses_with_503(tmp_path: Path) -> None:
    app, recorder = _app(tmp_path, max_rows=1, urls=["sqlite:///" + str(tmp_path / "x.db")])
    recorder.start = lambda: None  # type: ignore[method-assign]  # no worker: the outbox fills
    with serve_asgi(app) as base:
        body = {"model": "fake", "prompt": "a", "max_tokens": 2}
        auth = {"authorization": "Bearer sk-a"}
        assert httpx.post(f"{base}/v1/completions", headers=auth, json=body).status_code == 200
        refused = httpx.post(f"{base}/v1/completions", headers=auth, json=body)
    assert refused.status_code == 503 and "usage" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]


def test_usage_command_reports_totals(tmp_path: Path, capsys: Any) -> None:
    app, _ = _app(tmp_path)
    with serve_asgi(app) as base:
        for n in (2, 3):
            httpx.post(f"{base}/v1/completions", headers={"authorization": "Bearer sk-a"},
                       json={"model": "fake", "prompt": "a", "max_tokens": n})
    db = "sqlite:///" + str(tmp_path / "data" / "usage.db")
    assert main(["usage", "--db", db, "--by", "tenant", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["tenant"] == "acme" and rows[0]["requests"] == 2
    assert rows[0]["completion_tokens"] == 5
    assert main(["usage", "--db", db, "--by", "tenant,model"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["tenant", "model", "requests"] and "acme" in table[1]


def test_streams_finishing_together_are_recorded_off_sqlite(tmp_path: Path) -> None:
    """Streams that end in the same engine step each get their own record, every one
    delivered with its mark; the serving thread never touches SQLite (its appends and marks
    go to the append log; the sink worker folds them)."""
    import threading

    app, recorder = _app(tmp_path)
    sql_threads: set[str] = set()
    connect = recorder.outbox._db

    def traced() -> Any:
        sql_threads.add(threading.current_thread().name)
        return connect()

    recorder.outbox._db = traced  # type: ignore[method-assign]
    n = 8

    async def burst(base: str) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async def one() -> None:
                r = await client.post(f"{base}/v1/completions", headers={
                    "authorization": "Bearer sk-a"}, json={
                    "model": "fake", "prompt": "a b", "max_tokens": 20, "stream": True})
                assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)

    with serve_asgi(app) as base:
        anyio.run(burst, base)
    stored = _stored(tmp_path)
    assert len({r.request_id for r in stored}) == n and all(r.final_chunk_sent for r in stored)
    assert any(name.startswith("usage-") for name in sql_threads), sql_threads  # the worker
    assert not any(name.startswith("uvicorn") for name in sql_threads), sql_threads


def test_a_worker_under_a_trickle_delivers_in_batches_not_per_record(tmp_path: Path) -> None:
    """While records keep arriving, the worker waits an interval between partial batches (it
    used to loop at once after any delivery, paying a batch's cost per record)."""
    from datetime import UTC, datetime

    from servekit.usage import Outbox, SinkWorker, UsageRecord

    writes: list[int] = []

    class CountingSink:
        def write(self, batch: Any) -> None:
            writes.append(len(batch))
            time.sleep(0.005)  # a sink round trip: records keep arriving meanwhile

        def close(self) -> None:
            pass

    box = Outbox(tmp_path / "o.db", ["c"])
    worker = SinkWorker(box, "c", CountingSink(), interval_s=0.25)
    worker.start()
    try:
        for i in range(200):  # about 0.4 s of one record per 2 ms
            row = box.append(UsageRecord(request_id=f"r{i}", idempotency_key=f"k{i}",
                                         time=datetime.now(UTC), key_id=None, tenant=None,
                                         model="m"))
            box.mark_sent(row)
            box.flush()
            time.sleep(0.002)
    finally:
        worker.stop()
    assert sum(writes) == 200
    assert len(writes) <= 8, writes
