"""Failover after the first byte: replicas SIGKILLed mid-stream, real processes on 127.0.0.1.

The gateway resumes each cut stream on another replica from the token ids it relayed; the client
sees one stream whose text equals the no-fault run's, billed once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from servekit.gateway import create_gateway
from tests.asgi_server import serve_asgi
from tests.server.cli_server import CliServer, cli_server, cli_servers

SECRET = "failover-secret"
FAKE = ["--fake", "--fake-token-delay", "0.02"]


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.05)


class Result:
    """What a client read from one stream."""

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.events = [e for e in raw.split("\n\n") if e]
        self.docs = [json.loads(e[len("data: "):]) for e in self.events
                     if e.startswith("data: {")]
        self.done = bool(self.events) and self.events[-1] == "data: [DONE]"

    @property
    def text(self) -> str:
        out = ""
        for doc in self.docs:
            for choice in doc.get("choices") or ():
                out += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        return out

    @property
    def texts(self) -> dict[int, str]:
        """Each choice's text (several choices' events interleave as they come)."""
        out: dict[int, str] = {}
        for doc in self.docs:
            for choice in doc.get("choices") or ():
                out[choice["index"]] = out.get(choice["index"], "") + (
                    choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        return out

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.docs[-1].get("usage") if self.docs else None


async def _stream(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any],
                  started: asyncio.Event | None = None, after: int = 3) -> Result:
    raw = ""
    async with client.stream("POST", url + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for chunk in r.aiter_text():
            raw += chunk
            if started is not None and raw.count("\n\n") >= after:
                started.set()
    return Result(raw)


def _busiest(replicas: list[CliServer]) -> CliServer:
    loads = [httpx.get(r.url + "/ready").json()["in_flight"] for r in replicas]
    assert max(loads) > 0, "no stream is in flight to cut"
    return replicas[loads.index(max(loads))]


async def _run(gw: str | list[str], requests: list[tuple[str, dict[str, Any]]],
               kill_from: list[CliServer] | None = None) -> tuple[list[Result], CliServer | None]:
    """Stream every request at once (through the gateways ``gw`` in turn); with ``kill_from``,
    SIGKILL the replica holding the most streams once every stream has sent a few events."""
    killed = None
    gws = [gw] if isinstance(gw, str) else gw
    async with httpx.AsyncClient(timeout=120) as client:
        events = [asyncio.Event() for _ in requests]
        tasks = [asyncio.create_task(_stream(client, gws[i % len(gws)], path, body, ev))
                 for i, ((path, body), ev) in enumerate(zip(requests, events, strict=True))]
        if kill_from is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            killed = _busiest(kill_from)
            killed.proc.kill()
        results = await asyncio.gather(*tasks)
    return list(results), killed


def _failovers(gw: str) -> float:
    total = 0.0
    for line in httpx.get(gw + "/metrics").text.splitlines():
        if line.startswith("servekit_gateway_failovers_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _requests(model: str, max_tokens: int, sampling: dict[str, Any], n: int = 3
              ) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        common = {"model": model, "max_tokens": max_tokens, **sampling,
                  "stream_options": {"include_usage": True}}
        out.append(("/v1/completions", {**common, "prompt": f"ROMEO {i}:"}))
        out.append(("/v1/chat/completions",
                    {**common, "messages": [{"role": "user", "content": f"Speak, {i}."}]}))
    return out


def _check_continuous(result: Result, expected: Result, max_tokens: int) -> None:
    assert result.done, result.raw[-500:]
    assert ": servekit" not in result.raw  # the gateway stripped the token ids
    assert result.texts == expected.texts
    assert len({(d["id"], d["created"]) for d in result.docs}) == 1  # one stream
    opened = [c["index"] for d in result.docs for c in d.get("choices") or ()
              if (c.get("delta") or {}).get("role")]
    assert len(opened) == len(set(opened))  # one opening chunk per choice, at most
    assert result.usage is not None and expected.usage is not None
    billed = ("prompt_tokens", "completion_tokens", "total_tokens")  # once, for all outputs
    assert [result.usage[k] for k in billed] == [expected.usage[k] for k in billed]
    assert result.usage["completion_tokens"] <= max_tokens * len(result.texts)


@pytest.fixture
def fake_replicas(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[CliServer]]:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_servers(*[FAKE] * 2) as servers:
        yield servers


def test_three_replicas_two_gateways_a_sigkill_loses_no_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways in front of three replicas, streams through both: the replica holding the
    most is SIGKILLed mid-stream, and every stream (of one choice or two) ends as in the
    no-fault run."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with ExitStack() as stack:
        replicas = stack.enter_context(cli_servers(*[FAKE] * 3))
        gws = [stack.enter_context(serve_asgi(create_gateway(
            [r.url for r in replicas], secret=SECRET, probe_interval=0.1))) for _ in range(2)]
        for gw in gws:
            _wait_ready(gw)
        # 10 streams, 5 through each gateway; two of them of two choices each
        requests = _requests("fake", 60, {}, 4) + _requests("fake", 60, {"n": 2}, 1)
        expected, _ = asyncio.run(_run(gws, requests))
        results, killed = asyncio.run(_run(gws, requests, kill_from=replicas))
        assert killed is not None
        assert sum(_failovers(gw) for gw in gws) >= 1
        assert any(f'servekit_gateway_failovers_total{{replica="{killed.url}"}}'
                   in httpx.get(gw + "/metrics").text for gw in gws)
    for result, want in zip(results, expected, strict=True):
        _check_continuous(result, want, 60)
        assert len(result.texts) == len(want.texts) >= 1


def test_streams_of_several_choices_resume_each_choice(fake_replicas: list[CliServer]) -> None:
    """n = 2: each choice is resumed from its own token ids and every choice's text equals
    the no-fault run's (a choice that finished before the cut is not continued:
    test_replica_api)."""
    app = create_gateway([r.url for r in fake_replicas], secret=SECRET, probe_interval=0.1)
    requests = _requests("fake", 80, {"n": 2}, 2)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        expected, _ = asyncio.run(_run(gw, requests))
        results, killed = asyncio.run(_run(gw, requests, kill_from=fake_replicas))
        assert killed is not None and _failovers(gw) >= 1
    for result, want in zip(results, expected, strict=True):
        _check_continuous(result, want, 80)
        assert sorted(result.texts) == [0, 1]


def test_no_replica_left_ends_the_stream_with_an_error_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_server(*FAKE) as replica:
        app = create_gateway([replica.url], secret=SECRET, probe_interval=0.1)
        with serve_asgi(app) as gw:
            _wait_ready(gw)
            (result,), _ = asyncio.run(_run(gw, _requests("fake", 100, {})[:1],
                                            kill_from=[replica]))
    assert result.done and result.text  # what came before the cut, then the error
    error = result.docs[-1]["error"]
    assert error["code"] == "stream_interrupted" and error["type"] == "service_unavailable"
    assert ": servekit" not in result.raw


def test_without_the_secret_a_cut_stream_ends_as_today(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In front of replicas that send no token ids (not servekit, or not trusting us), the
    gateway does not fail over after the first byte: the stream ends where it was cut."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with ExitStack() as stack:
        replicas = stack.enter_context(cli_servers(*[FAKE] * 2))
        app = create_gateway([r.url for r in replicas], secret=None, probe_interval=0.1)
        with serve_asgi(app) as gw:
            _wait_ready(gw)
            (result,), _ = asyncio.run(_run(gw, _requests("fake", 100, {})[:1],
                                            kill_from=replicas))
            assert _failovers(gw) == 0
    assert not result.done and ": servekit" not in result.raw


def test_a_client_cannot_send_the_resume_extension(fake_replicas: list[CliServer]) -> None:
    app = create_gateway([r.url for r in fake_replicas], secret=SECRET, probe_interval=0.1)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        r = httpx.post(gw + "/v1/completions", timeout=10, json={
            "model": "fake", "prompt": "x", "max_tokens": 4,
            "servekit_resume": {"output_token_ids": [1, 2]}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "servekit_resume"
        # nor ask for the token ids: the gateway drops x-servekit-* headers
        s = httpx.post(gw + "/v1/completions", timeout=10,
                       headers={"x-servekit-extensions": "token_ids"},
                       json={"model": "fake", "prompt": "x", "max_tokens": 4, "stream": True})
        assert s.status_code == 200 and ": servekit" not in s.text
        assert "x-servekit-extensions" not in s.headers


@pytest.mark.slow
def test_demo_replica_killed_mid_stream_text_equals_the_no_fault_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy and seeded streams of the demo model (CPU, fp32), through two gateways in front
    of three replicas, resumed on another replica continue with exactly the tokens of the
    uninterrupted run."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    n = 40
    with ExitStack() as stack:
        replicas = stack.enter_context(cli_servers(*[["--kv-cache-mb", "16"]] * 3))
        gw = [stack.enter_context(serve_asgi(create_gateway(
            [r.url for r in replicas], secret=SECRET, probe_interval=0.1))) for _ in range(2)]
        for url in gw:
            _wait_ready(url)
        model = httpx.get(replicas[0].url + "/v1/models").json()["data"][0]["id"]
        requests = (_requests(model, n, {"temperature": 0, "ignore_eos": True}, 2)
                    + _requests(model, n, {"temperature": 0.9, "seed": 7, "ignore_eos": True}, 2)
                    + _requests(model, n, {"temperature": 0.9, "seed": 3, "ignore_eos": True,
                                           "n": 2}, 1))
        expected, _ = asyncio.run(_run(gw, requests))
        results, killed = asyncio.run(_run(gw, requests, kill_from=replicas))
        assert killed is not None and sum(_failovers(url) for url in gw) >= 1
    for result, want in zip(results, expected, strict=True):
        _check_continuous(result, want, n)
        assert result.usage is not None
        assert result.usage["completion_tokens"] == n * len(result.texts)


def test_streams_cut_by_a_drain_fail_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolling update: a replica told to stop (SIGTERM) ends its streams past the grace
    period with a ``draining`` error; the gateway resumes them on the other replica."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    requests = _requests("fake", 150, {})
    with ExitStack() as stack:
        replicas = stack.enter_context(cli_servers(*[[*FAKE, "--grace-period", "0.2"]] * 2))
        app = create_gateway([r.url for r in replicas], secret=SECRET, probe_interval=0.1)
        gw = stack.enter_context(serve_asgi(app))
        _wait_ready(gw)
        expected, _ = asyncio.run(_run(gw, requests))

        async def drain_one() -> list[Result]:
            async with httpx.AsyncClient(timeout=60) as client:
                events = [asyncio.Event() for _ in requests]
                tasks = [asyncio.create_task(_stream(client, gw, path, body, ev))
                         for (path, body), ev in zip(requests, events, strict=True)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                _busiest(replicas).proc.terminate()
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(drain_one())
        assert _failovers(gw) >= 1
        assert 'outcome="stream_drained"' in httpx.get(gw + "/metrics").text  # not a reset
    for result, want in zip(results, expected, strict=True):
        _check_continuous(result, want, 150)
