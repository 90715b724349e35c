"""A replica process killed and started again on its URL (real processes on 127.0.0.1): the
gateway re-admits it through its half-open breaker (one probe request, then back in
rotation), and drops the blocks the old process held from its KV-event index, so no request
is routed there for a cache it no longer has."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from servekit.gateway import create_gateway
from tests.asgi_server import free_port, serve_asgi
from tests.server.cli_server import cli_server, cli_servers

SECRET = "restart-secret"


def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _state(gw: str, url: str) -> str:
    return str(httpx.get(gw + "/ready").json()["replicas"][url])


def _routed(gw: str, url: str, reason: str | None = None) -> float:
    """Routing decisions the gateway made for ``url`` (for ``reason``, else any)."""
    total = 0.0
    for m in re.finditer(r'^servekit_gateway_routing_decisions_total\{reason="([^"]+)",'
                         r'replica="([^"]+)"\} (\S+)$', httpx.get(gw + "/metrics").text, re.M):
        if m[2] == url and reason in (None, m[1]):
            total += float(m[3])
    return total


def _breaker(gw: str, url: str) -> str:
    """The state the gateway's ``replica_state`` gauge gives ``url`` (the one set to 1)."""
    found = re.findall(r'^servekit_gateway_replica_state\{replica="([^"]+)",state="([^"]+)"\} '
                       r'1\.0$', httpx.get(gw + "/metrics").text, re.M)
    [state] = [s for u, s in found if u == url]
    return state


async def _streams(gw: str, n: int, max_tokens: int) -> list[int]:
    """``n`` streams at once; each one's status."""
    body = {"model": "fake", "prompt": "hi", "max_tokens": max_tokens, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        async def one() -> int:
            r = await client.post(gw + "/v1/completions", json=body)
            assert r.text.endswith("data: [DONE]\n\n")
            return r.status_code

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_a_killed_replica_that_returns_is_readmitted_through_half_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    fake = ("--fake", "--fake-token-delay", "0.02")
    port = free_port()
    b_url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        a, b = stack.enter_context(cli_servers(fake, fake, ports=[free_port(), port]))
        # a long cool-down: a probe that fails, or never reports, cannot be retried here
        gw = stack.enter_context(serve_asgi(create_gateway(
            [a.url, b_url], policy="round_robin", secret=SECRET, probe_interval=0.1,
            cooldown=60.0)))
        _until(lambda: _state(gw, b_url) == "up", "replica b not up")
        b.proc.kill()
        _until(lambda: _state(gw, b_url) == "down", "the dead replica still in rotation")
        assert asyncio.run(_streams(gw, 4, 5)) == [200] * 4  # all served by a
        stack.enter_context(cli_server(*fake, port=port))  # b again: a new process
        _until(lambda: _state(gw, b_url) != "down", "the restarted replica not noticed")
        assert _state(gw, b_url) == "ejected"  # half-open: not in rotation before a probe
        assert _breaker(gw, b_url) == "ejected"
        before = _routed(gw, b_url)
        # six 1-second streams at once: the first routed to b is its probe, and while it
        # runs nothing else goes there
        assert asyncio.run(_streams(gw, 6, 50)) == [200] * 6
        assert _routed(gw, b_url) - before == 1
        assert _state(gw, b_url) == "up"  # the probe succeeded: the breaker is closed
        assert _breaker(gw, b_url) == "up"
        before = _routed(gw, b_url)
        assert asyncio.run(_streams(gw, 4, 5)) == [200] * 4
        assert _routed(gw, b_url) - before == 2  # back in the round-robin rotation


_COST = json.dumps({"base_s": 0.0005, "prefill_token_s": 1e-6, "decode_row_s": 1e-4,
                    "num_blocks": 256})


def test_a_restarted_replica_is_not_routed_to_for_blocks_it_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    body: dict[str, Any] = {"model": "fake", "max_tokens": 2, "temperature": 0,
                            "prompt": "system: you are terse. " * 10}  # 14 full blocks
    with ExitStack() as stack:
        procs = dict(zip(urls, stack.enter_context(cli_servers(
            *[["--fake-model-cost", _COST]] * 2, ports=ports)), strict=True))
        app = create_gateway(urls, secret=SECRET, probe_interval=0.1)
        gw = stack.enter_context(serve_asgi(app))
        fleet = app.state.fleet
        _until(lambda: len(fleet.encoders) == 2, "replicas not learned")
        encoder = fleet.encoder()
        hashes = encoder.block_hashes(encoder.request_ids("/v1/completions", body), None)
        assert len(hashes) == 14

        def complete() -> None:
            r = httpx.post(gw + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text

        def idle() -> bool:  # the replicas' load reports caught up (bounded load sees 0)
            loads = [fleet.router.reported_load(u) for u in urls]
            return all(x is not None and x.running + x.waiting == 0 for x in loads)

        complete()
        _until(lambda: list(fleet.index.cached_blocks(hashes).values()) == [14],
               "the prompt's blocks not indexed")
        [(owner, _)] = fleet.index.cached_blocks(hashes).items()
        _until(idle, "loads not reported idle")
        hits = _routed(gw, owner, "cache_hit")
        complete()  # the follow-up goes where the blocks are
        assert _routed(gw, owner, "cache_hit") == hits + 1

        epoch = fleet.epochs[owner]
        procs[owner].proc.kill()
        procs[owner].proc.wait()
        stack.enter_context(cli_server("--fake-model-cost", _COST,
                                       port=ports[urls.index(owner)]))
        _until(lambda: fleet.epochs.get(owner) not in (None, epoch), "restart not noticed")
        assert owner not in fleet.index.cached_blocks(hashes)  # the new process has none
        assert fleet.index.blocks(owner) == frozenset()
        hits = [_routed(gw, u, "cache_hit") for u in urls]
        _until(idle, "loads not reported idle")
        complete()  # no replica holds the blocks now: no cache hit claimed anywhere
        assert [_routed(gw, u, "cache_hit") for u in urls] == hits
        # and the new events are indexed again, wherever that request ran
        _until(lambda: list(fleet.index.cached_blocks(hashes).values()) == [14],
               "the new process's blocks not indexed")
