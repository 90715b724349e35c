"""The gateway in front of real ``servekit serve --fake`` processes on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from servekit.gateway import RetryBudget, create_gateway
from tests.asgi_server import serve_asgi
from tests.server.cli_server import CliServer, cli_server, cli_servers

SECRET = "gw-secret"


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[CliServer]]:
    """Two ``--fake`` replicas of the test's own, for the tests that kill them."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_servers(["--fake"], ["--fake"]) as servers:
        yield servers


@pytest.fixture(scope="module")
def live_replicas() -> Iterator[list[CliServer]]:
    """Two ``--fake`` replicas shared by the tests that only send requests through them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
        with cli_servers(["--fake"], ["--fake"]) as servers:
            yield servers


def _wait_ready(url: str, ready: bool = True, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (httpx.get(url + "/ready").status_code == 200) != ready:
        assert time.monotonic() < deadline, f"gateway never became ready={ready}"
        time.sleep(0.05)


def _complete(url: str, stream: bool = False, **extra: object) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=10, json={
        "model": "fake", "prompt": "hello there", "max_tokens": 5, "stream": stream, **extra})


def test_forwards_completions_chat_streams_and_models(live_replicas: list[CliServer]) -> None:
    app = create_gateway([r.url for r in live_replicas], secret=SECRET, probe_interval=0.1)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        r = _complete(gw)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        chat = httpx.post(gw + "/v1/chat/completions", timeout=10, json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        s = _complete(gw, stream=True)
        assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")
        assert s.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 10
        while not app.state.fleet.models:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        models = httpx.get(gw + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["fake"]
        bad = _complete(gw, max_tokens=-1)  # the replica's 400 comes through unchanged
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        metrics = httpx.get(gw + "/metrics").text
        assert "servekit_gateway_replica_responses_total" in metrics


def test_a_dead_replica_is_retried_elsewhere_before_the_first_byte(
        replicas: list[CliServer]) -> None:
    """Kill one replica: every request still succeeds (connect errors are retried on the
    other replica), and the dead one leaves rotation."""
    app = create_gateway([r.url for r in replicas], secret=SECRET, probe_interval=60.0,
                         budget=RetryBudget(ratio=1.0, min_retries=100))
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        replicas[0].proc.kill()
        replicas[0].proc.wait()
        # the readiness probe sleeps 60 s: only passive failures can find the dead replica.
        # Equal loads tie-break by the routing key, so a fixed key would send every request to
        # one replica: vary the session so about half try the dead one first, and send until
        # its third connect error ejects it (bounded), checking every answer.
        health = app.state.fleet.router.health
        for i in range(60):
            r = httpx.post(gw + "/v1/completions", timeout=10,
                           headers={"x-session-id": f"session-{i}"},
                           json={"model": "fake", "prompt": "hello there", "max_tokens": 5,
                                 "stream": bool(i % 2)})
            assert r.status_code == 200, r.text
            if health.state(replicas[0].url).value == "ejected":
                break
        assert health.state(replicas[0].url).value == "ejected", health.failures(replicas[0].url)
        assert "retries_total" in httpx.get(gw + "/metrics").text


def test_all_replicas_down_is_503_with_retry_after(replicas: list[CliServer]) -> None:
    app = create_gateway([r.url for r in replicas], secret=SECRET, probe_interval=0.1)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        for replica in replicas:
            replica.proc.kill()
            replica.proc.wait()
        started = time.monotonic()
        for _ in range(3):
            r = _complete(gw)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable"
        assert time.monotonic() - started < 10
        _wait_ready(gw, ready=False)


def test_the_retry_budget_stops_a_storm() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.5, min_retries=1, window=10.0, clock=lambda: now[0])
    for _ in range(4):
        budget.request()
    assert [budget.try_retry() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 11.0  # the window moved on: only the floor is left
    assert budget.try_retry() and not budget.try_retry()


def test_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="replicas"):
        create_gateway([])


def _replica_metric(url: str, name: str) -> float:
    import re

    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^servekit_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"{name} not in {url}/metrics"
    return float(found.group(1))


def test_a_client_disconnect_aborts_the_request_on_the_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_server("--fake", "--fake-token-delay", "0.02") as replica:
        app = create_gateway([replica.url], secret=SECRET, probe_interval=0.1)
        with serve_asgi(app) as gw:
            _wait_ready(gw)
            with httpx.stream("POST", gw + "/v1/completions", timeout=10, json={
                    "model": "fake", "prompt": "x" * 100, "max_tokens": 2000,
                    "stream": True}) as r:
                lines = r.iter_lines()
                for _ in range(5):
                    next(lines)
                assert _replica_metric(replica.url, "open_streams") == 1
                assert _replica_metric(replica.url, "kv_blocks_in_use") > 0
            deadline = time.monotonic() + 10  # 2000 tokens would take 40 s; abort is fast
            while _replica_metric(replica.url, "open_streams") != 0:
                assert time.monotonic() < deadline, "the replica kept streaming"
                time.sleep(0.05)
            assert _replica_metric(replica.url, "kv_blocks_in_use") == 0


def test_servekit_gateway_command(live_replicas: list[CliServer]) -> None:
    import subprocess
    import sys

    from tests.server.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "servekit.server.cli", "gateway",
                             "--port", str(port), "--probe-interval", "0.1",
                             *[a for r in live_replicas for a in ("--replica", r.url)]])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert _complete(url).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_index_follows_a_real_replicas_kv_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Demo-model replica: after a request through the gateway, the gateway's KV-event index
    says that replica holds the prompt's blocks (hashes computed at the gateway), and the same
    prompt is routed there again as a cache hit."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_servers(["--kv-cache-mb", "16"], ["--kv-cache-mb", "16"]) as (a, b):
        app = create_gateway([a.url, b.url], secret=SECRET, probe_interval=0.1)
        fleet = app.state.fleet
        with serve_asgi(app) as gw:
            _wait_ready(gw)
            deadline = time.monotonic() + 30
            while len(fleet.encoders) < 2:
                assert time.monotonic() < deadline, "replica info never learned"
                time.sleep(0.05)
            prompt = "KING: " + "Now is the winter of our discontent. " * 8
            body = {"model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0}
            body["model"] = httpx.get(gw + "/v1/models").json()["data"][0]["id"]
            assert httpx.post(gw + "/v1/completions", json=body, timeout=60).status_code == 200
            encoder = fleet.encoder()
            hashes = encoder.block_hashes(encoder.prompt_ids(prompt))
            while not fleet.index.cached_blocks(hashes):
                assert time.monotonic() < deadline, "no KV events reached the index"
                time.sleep(0.05)
            (holder, held), = fleet.index.cached_blocks(hashes).items()
            assert held == len(hashes)
            for _ in range(3):
                assert httpx.post(gw + "/v1/completions", json=body, timeout=60).status_code == 200
            hits = [line for line in httpx.get(gw + "/metrics").text.splitlines()
                    if line.startswith("servekit_gateway_routing_decisions_total")
                    and 'reason="cache_hit"' in line]
            assert hits and holder in hits[0] and float(hits[0].split()[-1]) == 3.0
