"""Disconnects, draining and graceful shutdown, against the real server."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import anyio
import httpx
import pytest

from servekit.server import ApiKey, FakeEngine, KeyStore, create_app
from servekit.server.lifecycle import Phase, ServerState
from tests.server.conftest import free_port, serve, wait_for

AUTH = {"authorization": "Bearer sk-soak"}


async def _soak(url: str, n: int, seed: int, model: str = "fake", max_tokens: int = 40
                ) -> tuple[int, int]:
    """``n`` concurrent streams; each reads all, nothing, or a few events before hanging up."""
    rng = random.Random(seed)
    body = {"model": model, "prompt": "hello there", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    done = cut = 0
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60,
                                 limits=httpx.Limits(max_connections=n)) as client:

        async def one() -> None:
            nonlocal done, cut
            leave_after = rng.choice([None, 0, 1, 5, 20])
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
                        if leave_after is not None and events > leave_after:
                            cut += 1
                            return  # closing the response drops the connection
                        if line == "data: [DONE]":
                            done += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return done, cut


@pytest.mark.slow
def test_100_streams_with_random_disconnects_leak_nothing() -> None:
    engine = FakeEngine(token_delay=0.004)
    keys = KeyStore([ApiKey("sk-soak", tenant="soak", rpm=100_000, tpm=10_000_000)])
    with serve(create_app(engine, keys=keys)) as server:
        done, cut = asyncio.run(_soak(server.url, 100, seed=7))
        assert done + cut == 100 and done > 0 and cut > 0
        wait_for(lambda: server.metric("kv_blocks_in_use") == 0)
        assert server.metric("rate_limit_reservations") == 0
        assert server.metric("open_streams") == 0
        assert engine.num_live_requests == 0 and engine.num_used_blocks == 0
        assert engine.num_requests == 100
        # usage of the cut streams was settled (refunded), so the key still has its budget
        r = httpx.post(server.url + "/v1/completions", headers=AUTH,
                       json={"model": "fake", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_drain_refuses_new_work_and_finishes_in_flight() -> None:
    engine = FakeEngine(token_delay=0.01)
    app = create_app(engine)
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        body = {"model": "fake", "prompt": "x", "max_tokens": 30, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.service.state.begin_drain()
            ready = httpx.get(server.url + "/ready")
            assert ready.status_code == 503 and ready.json()["phase"] == "draining"
            refused = httpx.post(server.url + "/v1/completions",
                                 json={"model": "fake", "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            assert "retry-after" in refused.headers
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the in-flight stream finished
        assert len([x for x in rest if x.startswith("data: {")]) == 29


def test_drain_cancels_after_the_grace_period() -> None:
    async def main() -> None:
        state = ServerState()
        state.set_ready()
        finished: list[str] = []

        async def job(seconds: float, name: str) -> None:
            with state.track():
                await anyio.sleep(seconds)
                finished.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(job, 0.05, "short")
            tg.start_soon(job, 30.0, "long")
            await anyio.sleep(0.01)
            assert state.in_flight == 2
            start = anyio.current_time()
            assert await state.drain(0.3) == 1
            assert anyio.current_time() - start < 5
        assert finished == ["short"] and state.phase is Phase.STOPPED and state.in_flight == 0

    anyio.run(main)


def _cli(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SERVEKIT_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "servekit.server.cli", "serve", "--fake",
                             "--port", str(port), "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # a 503 while the engine loads waits too, not only a refused connection
    proc.kill()
    raise TimeoutError(proc.stdout.read().decode() if proc.stdout else "")


async def _streams(url: str, n: int, max_tokens: int, on_first: object) -> list[list[str]]:
    body = {"model": "fake", "prompt": "x", "max_tokens": max_tokens, "stream": True}
    first = asyncio.Event()
    started = 0

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one() -> list[str]:
            nonlocal started
            out = []
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line:
                            out.append(line)
                            if len(out) == 1:
                                started += 1
                                if started == n:
                                    first.set()
            except httpx.HTTPError as exc:
                out.append(f"error: {type(exc).__name__}")
            return out

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await first.wait()
        on_first()  # type: ignore[operator]
        return list(await asyncio.gather(*tasks))


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish_within_the_grace_period() -> None:
    proc, url = _cli("--fake-token-delay", "0.02", "--grace-period", "30")
    try:
        results = asyncio.run(_streams(url, 4, 100, lambda: proc.send_signal(signal.SIGTERM)))
        # uvicorn re-raises the signal after its graceful shutdown: "terminated by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=1)
    finally:
        proc.kill()
    assert all(r[-1] == "data: [DONE]" and len(r) == 101 for r in results), results


def _probe_during_drain(url: str, probes: dict[str, httpx.Response]) -> None:
    """While draining, the listener is open: /ready and new requests answer 503."""
    time.sleep(0.3)
    probes["ready"] = httpx.get(url + "/ready", timeout=2)
    probes["new"] = httpx.post(url + "/v1/completions", timeout=2,
                               json={"model": "fake", "prompt": "x", "max_tokens": 2})


@pytest.mark.slow
@pytest.mark.parametrize("grace", [1.0, 2.5])
def test_sigterm_cuts_streams_past_a_short_grace_period_cleanly(grace: float) -> None:
    import threading

    proc, url = _cli("--fake-token-delay", "0.05", "--grace-period", str(grace))
    probes: dict[str, httpx.Response] = {}

    def on_first() -> None:
        proc.send_signal(signal.SIGTERM)
        threading.Thread(target=_probe_during_drain, args=(url, probes), daemon=True).start()

    try:
        t0 = time.monotonic()
        results = asyncio.run(_streams(url, 8, 400, on_first))
        elapsed = time.monotonic() - t0
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode() if proc.stdout else ""
    finally:
        proc.kill()
    assert grace - 0.5 < elapsed < grace + 3.0
    for lines in results:  # every cut stream: an error event, then [DONE], then a clean end
        assert not any(x.startswith("error: ") for x in lines), lines[-3:]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"code": "draining"' in lines[-2], lines[-3:]
    assert "Traceback" not in log, log
    assert probes["ready"].status_code == 503 and probes["ready"].json()["phase"] == "draining"
    assert probes["new"].status_code == 503 and "retry-after" in probes["new"].headers
    assert probes["new"].json()["error"]["code"] == "draining"


@pytest.mark.parametrize("stream", [False, True])
def test_drain_past_the_grace_period_reports_an_error_not_a_truncated_success(
        stream: bool) -> None:
    from servekit.sched.params import SamplingParams
    from servekit.server.app import GenerationResponse
    from servekit.server.responses import CompletionEncoder
    from servekit.server.service import GenerationService, Job

    async def main() -> list[dict[str, object]]:
        engine = FakeEngine(token_delay=0.05)
        service = GenerationService(engine)
        service.state.set_ready()
        job = Job("cmpl-1", "fake", None, [[1, 2, 3]], [(0, SamplingParams(max_tokens=200))])
        response = GenerationResponse(service, job, CompletionEncoder(job, engine.tokenizer),
                                      stream, (await service.admit(job)).headers)
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        async def receive() -> dict[str, object]:
            await anyio.sleep_forever()
            raise AssertionError

        async with anyio.create_task_group() as tg:
            tg.start_soon(response, {}, receive, send)
            await anyio.sleep(0.2)
            assert await service.state.drain(0.05) == 1
        return sent

    sent = anyio.run(main)
    body = b"".join(m.get("body", b"") for m in sent)  # type: ignore[misc]
    if stream:
        assert b'"code": "draining"' in body and body.endswith(b"data: [DONE]\n\n")
    else:
        assert sent[0]["status"] == 503 and b'"code": "draining"' in body


@pytest.mark.parametrize("freeze", [False, True])
def test_the_start_up_heap_is_frozen_when_ready_only_when_configured(freeze: bool) -> None:
    import gc

    from servekit.server.app import ServerConfig

    gc.unfreeze()
    before = gc.get_freeze_count()
    try:
        app = create_app(FakeEngine(), config=ServerConfig(freeze_startup_heap=freeze))
        with serve(app) as running:
            assert httpx.get(running.url + "/ready").status_code == 200
            frozen = gc.get_freeze_count()
        assert (frozen > before) is freeze  # the engine, the app, the libraries: not walked
    finally:
        gc.unfreeze()  # this test process goes on building servers


def test_servekit_serve_freezes_its_start_up_heap() -> None:
    from servekit.server.cli import build_parser, server_parts
    from servekit.server.config import apply_config

    args = apply_config(build_parser().parse_args(["serve", "--fake"]))
    assert server_parts(args).config.freeze_startup_heap
