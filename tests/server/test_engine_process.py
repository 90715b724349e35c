"""The engine core in its own process (``--engine-process``): the same wire format, aborts,
overload and drain as in process, and a core crash reported, never hung on."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from servekit.engine.async_engine import EngineClosedError
from servekit.engine.core_client import EngineCoreClient
from servekit.sched.errors import DuplicateRequestError, QueueFullError
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.server import FakeEngine, create_app
from servekit.server.app import ServerConfig
from servekit.server.fake import FakeTokenizer, make_fake_engine
from tests.server.conftest import Running, serve, wait_for
from tests.server.test_lifecycle import _cli, _probe_during_drain, _streams

pytestmark = pytest.mark.slow

#: The same fake model in process and in the core: 2 running, 2 waiting, 5 ms per token.
FAKE = {"max_model_len": 512, "max_running": 2, "max_waiting": 2, "token_delay": 0.005}


def _client(**kwargs: Any) -> EngineCoreClient:
    return EngineCoreClient(functools.partial(make_fake_engine, **{**FAKE, **kwargs}),
                            tokenizer=FakeTokenizer(), log_level="warning", frontend_timeout=2.0)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Running, Running]]:
    """(in process, core in its own process), the same fake model behind each."""
    config = ServerConfig(model_names=("fake",))
    with serve(create_app(FakeEngine(**FAKE), config=config)) as local, \
            serve(create_app(_client(), config=config)) as split:
        yield local, split


def _normalise(text: str) -> str:
    text = re.sub(r'"id": ?"[^"]+"', '"id":"X"', text)
    return re.sub(r'"created": ?\d+', '"created":0', text)


REQUESTS = [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 12}),
    ("/v1/completions", {"prompt": ["a", "bc"], "max_tokens": 5, "n": 2, "logprobs": 3,
                         "stop": ["fox"]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 30, "stream": True, "stop": [" bro"],
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 6, "stream": True,
                         "echo": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 9, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2,
                              "max_completion_tokens": 7, "stream": True, "logprobs": True,
                              "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize(("path", "body"), REQUESTS)
def test_responses_are_byte_identical_to_the_in_process_engine(
        servers: tuple[Running, Running], path: str, body: dict[str, Any]) -> None:
    local, split = servers
    body = {"model": "fake", **body}
    a = httpx.post(local.url + path, json=body, timeout=30)
    b = httpx.post(split.url + path, json=body, timeout=30)
    assert a.status_code == b.status_code == 200
    assert a.headers["content-type"] == b.headers["content-type"]
    assert _normalise(a.text) == _normalise(b.text)
    assert len(a.text) > 100


def test_bad_requests_get_the_same_400_naming_the_field(servers: tuple[Running, Running]) -> None:
    local, split = servers
    body = {"model": "fake", "prompt": [1, 2, 999], "max_tokens": 4}
    a = httpx.post(local.url + "/v1/completions", json=body)
    b = httpx.post(split.url + "/v1/completions", json=body)
    assert a.status_code == b.status_code == 400
    assert a.json() == b.json() and b.json()["error"]["param"] == "prompt"


def test_a_client_disconnect_aborts_the_request_in_the_core(
        servers: tuple[Running, Running]) -> None:
    _, split = servers
    client = split.service.engine
    body = {"model": "fake", "prompt": "x" * 40, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", split.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: client.num_live_requests == 1 and client.num_used_blocks > 0)
    # the connection closed mid-stream: the core aborted the request and freed its blocks
    wait_for(lambda: client.num_live_requests == 0 and client.num_used_blocks == 0, timeout=5)
    wait_for(lambda: split.metric("kv_blocks_in_use") == 0 and split.metric("open_streams") == 0)


def test_a_full_queue_in_the_core_is_a_503_with_retry_after(
        servers: tuple[Running, Running]) -> None:
    _, split = servers
    body = {"model": "fake", "prompt": "x", "max_tokens": 300, "stream": True}

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=split.url, timeout=30) as http:
            async def hold(started: anyio.Event) -> None:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        started.set()

            async with anyio.create_task_group() as tg:
                for _ in range(4):  # 2 running + 2 waiting fill the fake's bounds
                    started = anyio.Event()
                    tg.start_soon(hold, started)
                    if _ < 2:
                        await started.wait()
                await anyio.sleep(0.3)
                over = await http.post("/v1/completions", json={**body, "stream": False})
                tg.cancel_scope.cancel()
            return over

    over = anyio.run(run)
    assert over.status_code == 503, over.text
    assert over.json()["error"]["code"] == "overloaded"
    assert float(over.headers["retry-after"]) == 1.0
    wait_for(lambda: split.service.engine.num_live_requests == 0, timeout=5)


def test_engine_errors_cross_the_process_boundary_as_their_own_types() -> None:
    async def run() -> None:
        async with _client(max_running=1, max_waiting=0) as core:
            long = core.generate([1, 2], SamplingParams(max_tokens=200), request_id="a")
            assert (await long.__anext__()).new_text == "t"
            with pytest.raises(DuplicateRequestError):
                await core.generate([1], SamplingParams(max_tokens=2), request_id="a").__anext__()
            with pytest.raises(QueueFullError) as full:
                await core.generate([1], SamplingParams(max_tokens=2)).__anext__()
            assert full.value.retry_after == 1.0 and full.value.limit == "max_waiting_requests"
            await core.abort("a")
            outs = [out async for out in long]
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            with pytest.raises(InvalidParameterError) as bad:
                await core.generate([1], SamplingParams(max_tokens=2),
                                    output_token_ids=[1, 2, 3]).__anext__()
            assert bad.value.param == "output_token_ids"

    anyio.run(run)


def test_killing_the_core_fails_in_flight_streams_and_turns_ready_to_503() -> None:
    config = ServerConfig(model_names=("fake",))
    with serve(create_app(_client(), config=config)) as split:
        pid = split.service.engine.core_pid
        body = {"model": "fake", "prompt": "x", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", split.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_failed" and "exit code -9" in error["message"]
        ready = httpx.get(split.url + "/ready")
        assert ready.status_code == 503 and ready.json()["phase"] == "failed"
        new = httpx.post(split.url + "/v1/completions", json={**body, "stream": False})
        assert new.status_code == 503 and new.json()["error"]["code"] == "engine_failed"
        assert split.metric("open_streams") == 0


def test_a_silent_front_end_has_its_requests_aborted_by_the_core() -> None:
    async def run() -> None:
        async with _client() as owner:
            other = EngineCoreClient(tokenizer=FakeTokenizer(), address=owner.address)
            await other.__aenter__()
            stream = other.generate([1], SamplingParams(max_tokens=1000))
            await stream.__anext__()
            await anyio.sleep(0.5)
            assert owner.num_live_requests == 1
            other._interval = 3600  # hangs: no heartbeat, no abort, no bye from now on
            t0 = time.monotonic()
            with anyio.fail_after(8):
                while owner.num_live_requests:
                    await anyio.sleep(0.1)
            assert time.monotonic() - t0 > 1.0  # not before the 2 s of silence it is allowed
            assert owner.num_used_blocks == 0
            await stream.aclose()
            await other.__aexit__(None, None, None)

    anyio.run(run)


def test_a_core_that_cannot_start_says_why() -> None:
    async def run() -> None:
        client = EngineCoreClient(functools.partial(make_fake_engine, tokens_per_yield=0),
                                  tokenizer=FakeTokenizer(), log_level="critical")
        with pytest.raises(EngineClosedError, match="tokens_per_yield must be at least 1"):
            await client.__aenter__()

    anyio.run(run)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_sigterm_drains_like_in_process_then_stops_the_core() -> None:
    proc, url = _cli("--engine-process", "--fake-token-delay", "0.05", "--grace-period", "1.5")
    probes: dict[str, httpx.Response] = {}
    (core,) = _children(proc.pid)

    def on_first() -> None:
        proc.send_signal(signal.SIGTERM)
        threading.Thread(target=_probe_during_drain, args=(url, probes), daemon=True).start()

    try:
        results = asyncio.run(_streams(url, 4, 400, on_first))
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode() if proc.stdout else ""
    finally:
        proc.kill()
    for lines in results:  # cut at the grace period: an error event, [DONE], a clean end
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"code": "draining"' in lines[-2], lines[-3:]
        assert len(lines) > 10
    assert "Traceback" not in log, log
    assert probes["ready"].status_code == 503 and probes["ready"].json()["phase"] == "draining"
    assert probes["new"].status_code == 503
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{core}") and time.monotonic() < deadline:
        time.sleep(0.05)  # reaped by the front end (or, once it exited, by init)
    status = f"/proc/{core}/status"
    assert not os.path.exists(status) or "zombie" in Path(status).read_text()


def test_two_front_end_processes_share_one_core_and_drain_on_sigterm() -> None:
    proc, url = _cli("--api-processes", "2", "--fake-token-delay", "0.01")
    try:
        deadline = time.monotonic() + 60  # both front ends listening and ready
        while sum(httpx.get(url + "/ready").status_code == 200 for _ in range(20)) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) == 3  # the core and two front ends
        served_by = set()
        for _ in range(24):  # each on a new connection: the kernel spreads them
            r = httpx.post(url + "/v1/completions",
                           json={"model": "fake", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "the"
            served_by |= {p for p in children if r.headers["x-request-id"].startswith(
                f"cmpl-{p:x}")}
        assert len(served_by) == 2
        results = asyncio.run(_streams(url, 6, 100, lambda: proc.send_signal(signal.SIGTERM)))
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    for lines in results:
        assert lines[-1] == "data: [DONE]" and len(lines) == 101, (len(lines), lines[-3:])
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{p}/status") and "zombie" not in
                   Path(f"/proc/{p}/status").read_text() for p in children)


def test_the_demo_model_in_its_own_process_gives_the_same_tokens_and_forwards_its_events(
        ) -> None:
    from servekit.engine import AsyncEngine, LLMEngine
    from servekit.metrics.hooks import Hook, HookSet
    from servekit.server.cli import DEMO_MODEL, build_engine, build_parser
    from servekit.server.config import apply_config
    from servekit.server.replica_api import KVEventFeed

    class Finished(Hook):
        def __init__(self) -> None:
            self.ids: list[str] = []

        def on_request_finished(self, event: Any) -> None:
            self.ids.append(event.request_id)

    feed, finished = KVEventFeed(), Finished()
    args = apply_config(build_parser().parse_args(["serve", "--engine-process",
                                                   "--kv-cache-mb", "16"]))
    client = build_engine(args, HookSet([feed, finished]))
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2)
    prompt = client.tokenizer.encode("ROMEO:\nWhat light")

    async def run(engine: Any) -> list[Any]:
        async with engine:
            return [out async for out in engine.generate(prompt, params, request_id="r")]

    split = anyio.run(run, client)
    local = anyio.run(run, AsyncEngine(LLMEngine(str(DEMO_MODEL))))
    assert [o.new_token_ids for o in split] == [o.new_token_ids for o in local]
    assert "".join(o.new_text for o in split) == "".join(o.new_text for o in local)
    # the same alternatives, with the same logprobs up to float noise: the core process runs
    # torch with its own thread count, so float sums may differ in the last bits
    lps = [(lp, lq) for o, p in zip(split, local, strict=True)
           for lp, lq in zip(o.logprobs or [], p.logprobs or [], strict=True)]
    assert len(lps) == 24
    assert [(a.token_id, [t for t, _ in a.top]) for a, _ in lps] == \
        [(b.token_id, [t for t, _ in b.top]) for _, b in lps]
    assert [v for a, _ in lps for v in (a.logprob, *(x for _, x in a.top))] == pytest.approx(
        [v for _, b in lps for v in (b.logprob, *(x for _, x in b.top))], abs=1e-4)
    assert split[-1].finish_reason == "length" and split[-1].num_output_tokens == 24
    assert finished.ids == ["r"]  # the engine's events reached the front end's hooks
    assert any(e["type"] == "stored" for e in feed.since(-1))  # and its KV events
