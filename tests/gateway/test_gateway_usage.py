"""The gateway writes the ledger record of each client request; the replicas behind it record
their attempts for analytics only. Real processes: two ``servekit serve --fake`` replicas and
the gateway (with the secret and keys), all delivering into one SQLite sink."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servekit.gateway import create_gateway
from servekit.limit.keys import ApiKey, KeyStore
from servekit.server.cli import main
from servekit.usage import UsageRecord, UsageRecorder
from servekit.usage.sinks.sqlite import SQLiteSink
from tests.asgi_server import serve_asgi
from tests.gateway.test_failover import Result, _busiest, _wait_ready
from tests.server.cli_server import CliServer, cli_servers

SECRET = "usage-secret"
KEYS = {"sk-a": "acme", "sk-b": "beta"}


def _sink(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'usage.db'}"


def _rows(tmp_path: Path) -> list[UsageRecord]:
    sink = SQLiteSink(tmp_path / "usage.db")
    try:
        return sink.read_all()
    finally:
        sink.close()


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[CliServer]]:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_servers(*[["--fake", "--fake-token-delay", "0.02", "--grace-period", "0.2",
                        "--data-dir", str(tmp_path / f"replica{i}"), "--usage", _sink(tmp_path)]
                       for i in range(2)]) as servers:
        yield servers


def _gateway(replicas: list[CliServer], tmp_path: Path) -> Any:
    keys = KeyStore([ApiKey(key=k, tenant=t) for k, t in KEYS.items()])
    recorder = UsageRecorder(tmp_path / "gateway", [_sink(tmp_path)], secret=b"g" * 32,
                             outbox="gateway-usage-outbox.db")
    return create_gateway([r.url for r in replicas], secret=SECRET, probe_interval=0.1,
                          keys=keys, usage=recorder)


def _requests(max_tokens: int) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for i, key in enumerate([*KEYS, *KEYS]):
        common = {"model": "fake", "max_tokens": max_tokens, "stream": True}
        if i % 2 == 0:  # the client asks for its usage chunk, or it does not
            common["stream_options"] = {"include_usage": True}
        out.append((key, "/v1/completions", {**common, "prompt": f"ROMEO {i}:"}))
        out.append((key, "/v1/chat/completions",
                    {**common, "messages": [{"role": "user", "content": f"Speak, {i}."}]}))
    return out


async def _stream(client: httpx.AsyncClient, gw: str, key: str, path: str,
                  body: dict[str, Any], started: asyncio.Event) -> Result:
    raw = ""
    async with client.stream("POST", gw + path, json=body,
                             headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200, await r.aread()
        async for chunk in r.aiter_text():
            raw += chunk
            if raw.count("\n\n") >= 3:
                started.set()
    return Result(raw)


async def _load(gw: str, requests: list[tuple[str, str, dict[str, Any]]],
                fault: Any = None) -> list[Result]:
    """Stream every request at once; ``fault()`` runs once each has sent a few events."""
    async with httpx.AsyncClient(timeout=120) as client:
        events = [asyncio.Event() for _ in requests]
        tasks = [asyncio.create_task(_stream(client, gw, key, path, body, ev))
                 for (key, path, body), ev in zip(requests, events, strict=True)]
        if fault is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            fault()
        return list(await asyncio.gather(*tasks))


def _wait_for(tmp_path: Path, ok: Any, timeout: float = 20.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(tmp_path)
        if ok(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _check_ledger(tmp_path: Path, results: list[Result],
                  requests: list[tuple[str, str, dict[str, Any]]],
                  others: int = 0) -> list[UsageRecord]:
    """One ledger row per client request (the streams of ``results`` and ``others`` more)
    with the client's billed numbers; every other row is one attempt of a ledger row's
    request, analytics only."""
    rows = _rows(tmp_path)
    ledger = {r.request_id: r for r in rows if r.ledger}
    assert len([r for r in rows if r.ledger]) == len(results) + others == len(ledger)
    for result, (key, _, body) in zip(results, requests, strict=True):
        assert result.done, result.raw[-300:]
        stream_id = result.docs[0]["id"]
        row = ledger[stream_id]
        prompt, completion = row.prompt_tokens, row.completion_tokens
        if result.usage is not None:  # exactly what the client was billed
            assert (prompt, completion) == (result.usage["prompt_tokens"],
                                            result.usage["completion_tokens"])
        assert completion == body["max_tokens"]  # the fake never stops early
        assert row.final_chunk_sent and row.http_status == 200
        assert row.tenant == KEYS[key] and row.key_id is not None and key not in row.key_id
        assert row.finish_reason == "length"
        assert all(r.startswith("http://127.0.0.1:") for r in row.replicas)
    keys = {r.idempotency_key for r in ledger.values()}
    for row in rows:
        if not row.ledger:  # an attempt: keyed under its request's ledger key
            assert row.idempotency_key.rsplit("#", 1)[0] in keys, row
    return rows


def _tenant_totals(tmp_path: Path, capsys: Any) -> dict[str, dict[str, int]]:
    assert main(["usage", "--db", _sink(tmp_path), "--by", "tenant", "--json"]) == 0
    return {r["tenant"]: r for r in json.loads(capsys.readouterr().out)}


def test_one_ledger_row_per_client_request_through_a_sigkill_failover(
        replicas: list[CliServer], tmp_path: Path, capsys: Any) -> None:
    requests = _requests(60)
    killed: list[CliServer] = []
    with serve_asgi(_gateway(replicas, tmp_path)) as gw:
        _wait_ready(gw)
        calm = asyncio.run(_load(gw, requests))
        whole = httpx.post(gw + "/v1/completions", timeout=30, headers={
            "authorization": "Bearer sk-a", "idempotency-key": "order-7"},
            json={"model": "fake", "prompt": "abc", "max_tokens": 5})
        assert whole.status_code == 200
        results = asyncio.run(_load(gw, requests, lambda: killed.append(
            _busiest(replicas)) or killed[0].proc.kill()))
    # the gateway's lifespan drained its outbox; the live replica drains every 0.2 s
    live = next(r for r in replicas if r is not killed[0])
    n_requests = 2 * len(requests) + 1
    rows = _wait_for(tmp_path, lambda rs: sum(1 for r in rs if r.ledger) >= n_requests
                     and any(r.idempotency_key.endswith("#2") for r in rs))
    both = results + calm
    _check_ledger(tmp_path, both, requests + requests, others=1)
    ledger = [r for r in rows if r.ledger]
    failed_over = [r for r in ledger if len(r.replicas) > 1]
    assert failed_over and all(killed[0].url in r.replicas for r in failed_over)
    assert all(r.replicas[-1] == live.url for r in failed_over)
    # the whole response: its own ledger row, under the client's idempotency key
    (plain,) = [r for r in ledger if r.request_id == whole.headers["x-request-id"]]
    assert plain.idempotency_key.endswith(":order-7")
    assert (plain.prompt_tokens, plain.completion_tokens) == (
        whole.json()["usage"]["prompt_tokens"], 5)
    # the live replica recorded the resumed attempts' compute: prompt + replayed prefill
    resumed = [r for r in rows if not r.ledger and r.idempotency_key.endswith("#2")]
    assert resumed and all(r.completion_tokens < 60 and r.prompt_tokens
                           + r.completion_tokens > 60 for r in resumed)
    # totals by tenant come from the ledger rows only
    totals = _tenant_totals(tmp_path, capsys)
    for tenant in KEYS.values():
        mine = [r for r in ledger if r.tenant == tenant]
        assert totals[tenant]["requests"] == len(mine)
        assert totals[tenant]["completion_tokens"] == sum(r.completion_tokens for r in mine)
    assert sum(t["requests"] for t in totals.values()) == n_requests


def test_a_drained_stream_is_billed_once_in_full(
        replicas: list[CliServer], tmp_path: Path, capsys: Any) -> None:
    """The known under-billing: after a drain failover the cut attempt's partial record was
    written first and the ledger kept it. Now the cut attempt's row is analytics only."""
    requests = _requests(150)
    drained: list[CliServer] = []

    def drain() -> None:
        drained.append(_busiest(replicas))
        drained[0].proc.terminate()

    with serve_asgi(_gateway(replicas, tmp_path)) as gw:
        _wait_ready(gw)
        results = asyncio.run(_load(gw, requests, drain))
    drained[0].proc.wait(30)  # it drained its outbox into the sink on the way out
    rows = _wait_for(tmp_path, lambda rs: sum(1 for r in rs if r.ledger) >= len(requests))
    rows = _check_ledger(tmp_path, results, requests)
    cut = [r for r in rows if not r.ledger and r.replicas and r.completion_tokens < 150
           and r.idempotency_key.endswith("#1")]
    assert cut, "the drained replica recorded its cut attempts"
    ledger = {r.idempotency_key: r for r in rows if r.ledger}
    for attempt in cut:  # each cut attempt's request is billed in full, once
        assert ledger[attempt.idempotency_key.rsplit("#", 1)[0]].completion_tokens == 150
    totals = _tenant_totals(tmp_path, capsys)
    assert sum(t["requests"] for t in totals.values()) == len(requests)
    assert sum(t["completion_tokens"] for t in totals.values()) == 150 * len(requests)
