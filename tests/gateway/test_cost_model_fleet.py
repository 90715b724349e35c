"""Replicas running the real engine over the cost-model runner: their KV events reach the
gateway's index, and cache-aware routing sends a prompt's follow-ups where its prefix is cached
(the replicas' own prefix-cache counters show the hits, and the gateway's predicted vs
reported cached tokens agree)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import httpx

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.engine.cost_runner import CostModelRunner
from servekit.gateway import create_gateway
from servekit.gateway.tokens import PromptEncoder
from servekit.metrics.hooks import HookSet
from servekit.route.kv_index import KVEventIndex
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeTokenizer
from tests.asgi_server import serve_asgi

SECRET = "cost-model"


def _engine(hooks: HookSet) -> Any:
    runner = CostModelRunner(base_s=0.0005, prefill_token_s=1e-6, decode_row_s=1e-4,
                             num_blocks=256)
    return AsyncEngine(LLMEngine(runner, config=EngineConfig(block_size=16),
                                 tokenizer=FakeTokenizer(), hooks=hooks))


def _replica() -> object:
    """A replica app whose engine shares the app's hooks (so its KV events reach the feed)."""
    hooks = HookSet()
    return create_app(lambda: _engine(hooks), hooks=hooks, config=ServerConfig(
        model_names=("fake",), gateway_secret=SECRET))


@contextmanager
def _fleet(n: int, policy: str) -> Iterator[tuple[str, list[str], object]]:
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_asgi(_replica())) for _ in range(n)]
        gateway = create_gateway(urls, policy=policy, secret=SECRET, probe_interval=0.05)
        gw = stack.enter_context(serve_asgi(gateway))
        _until(lambda: len(gateway.state.fleet.encoders) == n, "replicas not learned")
        yield gw, urls, gateway


def _until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _hits(url: str) -> tuple[float, float]:
    """``(prefix-cache hits, queries)`` in prompt tokens, from the replica's /metrics."""
    text = httpx.get(url + "/metrics").text
    found = {m[1]: float(m[2]) for m in re.finditer(
        r"^servekit_prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)$", text, re.M)}
    return found.get("hits", 0.0), found.get("queries", 0.0)


def _idle(router: Any, urls: list[str]) -> bool:
    """No request in flight through the gateway, and every replica reported none running."""
    def reported_idle(url: str) -> bool:
        load = router.reported_load(url)
        return load is None or load.running + load.waiting == 0

    return all(router.loads[u] == 0 and reported_idle(u) for u in urls)


def _complete(gw: str, prompt: str) -> None:
    r = httpx.post(gw + "/v1/completions", timeout=30, json={
        "model": "fake", "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_kv_events_of_a_real_engine_reach_the_index() -> None:
    with _fleet(1, "cache_aware") as (gw, [url], gateway):
        prompt = "system: you are terse. " * 10  # 231 bytes + bos: 14 full blocks
        _complete(gw, prompt)
        fleet = gateway.state.fleet  # type: ignore[attr-defined]
        hashes = PromptEncoder(_info(url)).block_hashes(FakeTokenizer().encode(prompt))
        assert len(hashes) == 14
        _until(lambda: fleet.index.cached_blocks(hashes) == {url: 14}, "blocks not indexed")


def test_follow_ups_land_where_their_prefix_is_cached() -> None:
    with _fleet(3, "cache_aware") as (gw, urls, gateway):
        fleet = gateway.state.fleet  # type: ignore[attr-defined]
        encoder = fleet.encoder()
        # five, not a multiple of three: round-robin would send follow-ups elsewhere
        prefixes = [f"tenant {i}: " + f"rule {i} says be brief. " * 12 for i in range(5)]
        for p in prefixes:
            _complete(gw, p)
        for p in prefixes:  # every prefix's blocks are indexed somewhere before follow-ups
            _until(partial(_indexed, fleet.index, encoder.block_hashes(
                FakeTokenizer().encode(p))), "prefix not indexed")
        before = [_hits(u) for u in urls]
        expected = 0
        for turn in range(3):
            for p in prefixes:
                # a finished request's replica may still report it running for one report
                # period; with one request in flight the bounded-load cap (1.25 x the mean)
                # is 1, so that stale report alone would send the follow-up elsewhere
                _until(partial(_idle, fleet.router, urls), "loads not reported idle")
                _complete(gw, p + f"user turn {turn}: go on")
                expected += len(encoder.block_hashes(FakeTokenizer().encode(p))) * 16
        gained = sum(_hits(u)[0] - b[0] for u, b in zip(urls, before, strict=True))
        predicted, reported = _cached(gw)
        # the gateway's metrics: what its index predicted cached where it routed, and what
        # those replicas reported (nothing evicted here: the index never over-claims)
        assert expected <= predicted <= reported
        # every follow-up found its whole prefix cached (later turns may hit more: their own
        # earlier turns share more blocks)
        assert gained >= expected
        # and the prefixes were spread, not all on one replica
        owners = {max(fleet.index.cached_blocks(encoder.block_hashes(
            FakeTokenizer().encode(p))).items(), key=lambda kv: kv[1])[0] for p in prefixes}
        assert len(owners) >= 2


def _cached(gw: str) -> tuple[float, float]:
    """The gateway's (predicted, replica-reported) cached prompt tokens, over all replicas."""
    text = httpx.get(gw + "/metrics").text
    found = {"predicted_": 0.0, "": 0.0}
    for m in re.finditer(r"^servekit_gateway_(predicted_)?cached_tokens_total\{[^}]*\} (\S+)$",
                         text, re.M):
        found[m[1] or ""] += float(m[2])
    return found["predicted_"], found[""]


def _indexed(index: KVEventIndex, hashes: list[int]) -> bool:
    return any(n == len(hashes) for n in index.cached_blocks(hashes).values())


def _info(url: str) -> dict[str, object]:
    return httpx.get(url + "/servekit/info",  # type: ignore[no-any-return]
                     headers={"x-servekit-gateway-secret": SECRET}).json()
