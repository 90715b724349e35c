"""Two demo-model replicas (the real engine and the bundled model, CPU) and the ingress on the
session's local Ray, one application for the module:

- the official openai client gets a completion, a chat completion and streams;
- requests sharing a long prefix land on one replica and hit its prefix cache, read from each
  replica's own counters, and the ingress's /metrics shows the same per-replica numbers;
- ``ray.kill`` of the replica serving streams mid-stream leaves every stream (greedy and
  seeded) complete and identical to the no-fault run, and the ingress counts the failovers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.deploy._apps import deployed, replica_stats, wait_for_replicas

pytestmark = pytest.mark.slow

APP = "servekit-demo-test"
MODEL = "servekit-demo"
#: block_size 16: a long shared prefix spans the router's 4 key blocks and more; 0.75 of the
#: session Ray's 2 CPUs, so the next module's app fits beside this one while it drains
CONFIG = """
[engine]
kv_cache_mb = 4
max_num_seqs = 8

[ray]
replicas = 2
replica_cpus = 0.25
ingress_cpus = 0.25
routing_policy = "cache_aware"
routing_stats_period = 0.5
"""
STREAMS = 4
MAX_TOKENS = 200  # the demo model's context is 256 tokens; ~3 ms a token on one core


@pytest.fixture(scope="module")
def app(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with deployed(ray_serve, tmp_path_factory.mktemp("demo"), CONFIG, APP) as url:
        wait_for_replicas(APP, 2)
        yield url


def client(app: str) -> Any:
    import openai

    return openai.OpenAI(base_url=app + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_gets_completion_chat_and_stream_from_the_demo_model(app: str) -> None:
    c = client(app)
    greedy = c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert greedy.choices[0].text and greedy.choices[0].finish_reason == "length"
    assert greedy.usage.completion_tokens == 16 and greedy.usage.prompt_tokens > 1
    chunks = list(c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=16,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == greedy.choices[0].text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1
    assert chunks[-1].usage == greedy.usage

    chat = c.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                     messages=[{"role": "user", "content": "Good morrow!"}])
    assert chat.choices[0].message.content
    assert 0 < chat.usage.completion_tokens <= 12
    streamed = c.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, stream=True,
                                         messages=[{"role": "user", "content": "Good morrow!"}])
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) \
        == chat.choices[0].message.content


def _serve_one(c: Any, prompt: str) -> tuple[str, int]:
    """The replica that served one completion, and the prompt tokens it found cached."""
    before = replica_stats(APP)
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = replica_stats(APP)
    grew = [r for r in after if after[r]["requests"] > before[r]["requests"]]
    assert len(grew) == 1, (before, after)
    return grew[0], after[grew[0]]["prefix_hits"] - before[grew[0]]["prefix_hits"]


def test_a_shared_prefix_lands_on_one_replica_and_hits_its_prefix_cache(app: str) -> None:
    c = client(app)
    homes: dict[int, set[str]] = {}
    for group in range(12):  # until both replicas are some prefix's home (1 in 2048 not)
        # ~110 tokens: its first 64 make the routing key; 4 or more full blocks are shared
        prefix = f"Scene {group}. " + "Enter ROMEO and JULIET, with attendants. " * 4
        served = [_serve_one(c, f"{prefix}Speak {q}:") for q in range(3)]
        homes[group] = {replica for replica, _ in served}
        # the second and third found the prefix's blocks on their replica
        assert all(hits >= 4 * 16 for _, hits in served[1:]), served
        if group >= 3 and len(set().union(*homes.values())) == 2:
            break
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) == 2, homes  # prefixes spread


def metrics(app: str) -> dict[str, dict[str, float]]:
    """The ingress's ``servekit_ray_*`` samples: ``{name: {label value: value}}``."""
    text = httpx.get(app + "/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^servekit_ray_(\w+)\{\w+="([^"]*)"\} (\S+)$', text, re.M):
        out.setdefault(m[1], {})[m[2]] = float(m[3])
    return out


def test_the_ingress_metrics_show_each_replicas_reported_load(app: str) -> None:
    stats = replica_stats(APP)
    expected = {r: s["requests"] for r, s in stats.items()}
    deadline = time.monotonic() + 10  # the replicas report every 0.5 s

    def settled(got: dict[str, dict[str, float]]) -> bool:
        # a report counting the last request may have been taken while it still ran
        running = got.get("replica_num_requests_running", {})
        return got.get("replica_requests_total") == expected and not any(running.values())

    while not settled(got := metrics(app)):
        assert time.monotonic() < deadline, (got, expected)
        time.sleep(0.25)
    assert got["replica_prefix_cache_hits_total"] == {
        r: float(s["prefix_hits"]) for r, s in stats.items()}
    assert sum(got["replica_prefix_cache_hits_total"].values()) > 0
    assert set(got["replica_num_requests_running"]) == set(stats)  # idle: zeros
    assert set(got["replica_kv_cache_usage_perc"]) == set(stats)
    assert all(v == 0 for v in got["replica_num_requests_running"].values())


def stream(app: str, i: int) -> tuple[str, int | None, str | None]:
    """One stream: greedy completions (even ``i``) and seeded chats (odd)."""
    c = client(app)
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": True,
                              "stream_options": {"include_usage": True},
                              "extra_body": {"ignore_eos": True}}
    if i % 2:
        chunks = list(c.chat.completions.create(
            messages=[{"role": "user", "content": f"Speak, friend {i}."}], seed=i,
            temperature=1.0, **kwargs))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        chunks = list(c.completions.create(prompt=("ROMEO:", "JULIET:")[i // 2 % 2],
                                           temperature=0, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    reasons = [ch.choices[0].finish_reason for ch in chunks
               if ch.choices and ch.choices[0].finish_reason]
    usage = chunks[-1].usage.completion_tokens if chunks[-1].usage else None
    return text, usage, reasons[-1] if reasons else None


def run_all(app: str, during: Any = None) -> list[tuple[str, int | None, str | None]]:
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream, app, i) for i in range(STREAMS)]
        if during is not None:
            during()
        return [f.result() for f in futures]


def test_killing_a_replica_mid_stream_leaves_every_stream_complete_and_identical(
        app: str) -> None:
    import ray

    baseline = run_all(app)
    assert all(usage == MAX_TOKENS and reason == "length" and text
               for text, usage, reason in baseline), baseline
    assert len({text for text, _, _ in baseline}) == STREAMS
    failed_over = sum(metrics(app).get("failovers_total", {}).values())
    killed: list[dict[str, Any]] = []

    def kill_the_busiest() -> None:
        deadline = time.monotonic() + 20
        busy: list[dict[str, Any]] = []
        while time.monotonic() < deadline:  # every stream started: kill at once
            busy = [s for s in replica_stats(APP).values() if s["running"]]
            if sum(s["running"] for s in busy) == STREAMS:
                break
            time.sleep(0.02)
        victim = max(busy, key=lambda s: s["running"])
        ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)
        killed.append(victim)

    faulted = run_all(app, kill_the_busiest)
    assert killed and killed[0]["running"] >= 1
    assert faulted == baseline  # same text, usage counted once, same finish
    failovers = metrics(app)["failovers_total"]
    assert set(failovers) == {"actor_died"}  # each cut stream resumed on the other replica
    assert 1 <= failovers["actor_died"] - failed_over <= killed[0]["running"]
    wait_for_replicas(APP, 2)  # Ray replaces the replica; the app keeps serving
    after = client(app).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=16,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 16
