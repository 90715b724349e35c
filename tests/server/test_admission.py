"""Requests that can never be admitted are a 400 that says why; admissible ones are served."""

from __future__ import annotations

import httpx

from servekit.server import FakeEngine, create_app
from servekit.server.service import admission_capacity
from tests.server.conftest import serve


def test_more_choices_than_the_whole_capacity_is_a_400_not_a_retry() -> None:
    engine = FakeEngine(max_model_len=256, max_running=2, max_waiting=3)
    with serve(create_app(engine)) as server:
        url = server.url + "/v1/completions"
        r = httpx.post(url, json={"model": "fake", "prompt": "x", "max_tokens": 2, "n": 6})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "n" and "at most 5" in error["message"]
        assert "retry-after" not in r.headers
        r = httpx.post(url, json={"model": "fake", "prompt": ["a", "b", "c"], "max_tokens": 2,
                                  "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        chat = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 6,
            "max_tokens": 2})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
        # exactly the capacity, on an idle server: all admitted (running slots + waiting)
        r = httpx.post(url, json={"model": "fake", "prompt": "x", "max_tokens": 2, "n": 5})
        assert r.status_code == 200 and len(r.json()["choices"]) == 5
        assert engine.num_live_requests == 0


def test_the_real_engine_reports_its_capacity() -> None:
    from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
    from servekit.server.cli import DEMO_MODEL

    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(
        max_num_seqs=4, max_waiting_requests=7, kv_cache_bytes=2**20)))
    assert admission_capacity(engine) == 11


async def _burst(url: str, n: int) -> list[int]:
    import asyncio

    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=n + 4)) as client:
        body = {"model": "fake", "prompt": "x", "max_tokens": 3}
        rs = await asyncio.gather(*(client.post("/v1/completions", json=body)
                                    for _ in range(n)))
    return [r.status_code for r in rs]


def test_an_instant_burst_fills_running_slots_and_the_waiting_queue() -> None:
    import asyncio

    engine = FakeEngine(max_model_len=256, max_running=4, max_waiting=4, token_delay=0.2)
    with serve(create_app(engine)) as server:
        statuses = asyncio.run(_burst(server.url, 12))
    assert statuses.count(200) == 8 and statuses.count(503) == 4, statuses
