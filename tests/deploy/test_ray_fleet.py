"""Two engine replicas and two ingress replicas on a local Ray (one application for both tests,
to keep the suite short):

- a replica killed mid-stream (``ray.kill``): every stream through the ingress completes,
  identical to the no-fault run and billed once, because the ingress resumes each cut stream on
  the other replica after the tokens it already sent;
- rate limits: the ingress replicas share a real redis-server as their limiter store, so they
  admit a key's limit in total, not per replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.deploy._apps import deployed, replica_stats, wait_for_replicas
from tests.limit.conftest import RedisServer

pytestmark = pytest.mark.slow

APP = "servekit-fleet"
RPM = 20
STREAMS = 6
MAX_TOKENS = 150  # 1.5 s per stream


@pytest.fixture(scope="module")
def app(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = RedisServer()
    home = tmp_path_factory.mktemp("fleet")
    (home / "keys.json").write_text(json.dumps({"keys": [
        {"key": "sk-a", "tenant": "a", "rpm": RPM}, {"key": "sk-b", "tenant": "b"}]}))
    config = f"""
[server]
api_keys = "{home / 'keys.json'}"

[engine]
fake = true
fake_token_delay = 0.01

[limits]
store = "{redis.url}"

[ray]
replicas = 2
ingress_replicas = 2
replica_cpus = 0.25
ingress_cpus = 0.25
routing_policy = "least_loaded"
routing_stats_period = 0.5
"""
    try:
        with deployed(ray_serve, home, config, APP) as url:
            yield url
    finally:
        redis.stop()


def post(http: httpx.Client, key: str) -> httpx.Response:
    return http.post("/v1/completions", headers={"authorization": f"Bearer {key}"},
                     json={"model": "fake", "prompt": "hi", "max_tokens": 2})


def test_two_ingress_replicas_sharing_redis_admit_a_keys_limit_in_total(app: str) -> None:
    with httpx.Client(base_url=app, timeout=30) as http:
        assert post(http, "sk-wrong").status_code == 401
        start = time.monotonic()
        answers = [post(http, "sk-a") for _ in range(3 * RPM)]
        elapsed = time.monotonic() - start
        admitted = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        # at least 95 % of the limit, at most capacity + rate x T, over both replicas together
        assert 0.95 * RPM <= len(admitted) <= RPM + RPM / 60 * elapsed + 1e-9
        assert {r.status_code for r in refused} == {429}
        assert refused[0].headers["x-ratelimit-limit-requests"] == str(RPM)
        assert float(refused[0].headers["retry-after"]) > 0
        # both ingress replicas admitted some: a response id starts with its process's pid
        pids = {r.json()["id"].split("-")[1][:-6] for r in admitted}
        assert len(pids) == 2, pids
        assert all(post(http, "sk-b").status_code == 200 for _ in range(3))  # no limits


def stream(app: str, i: int, chat: bool) -> tuple[str, int | None, str | None]:
    """One streamed request's text, completion tokens (usage chunk) and finish reason."""
    import openai

    client = openai.OpenAI(base_url=app + "/v1", api_key="sk-b", max_retries=0, timeout=60)
    kwargs: dict[str, Any] = {"model": "fake", "max_tokens": MAX_TOKENS, "stream": True,
                              "stream_options": {"include_usage": True}, "seed": 7}
    if chat:
        chunks = list(client.chat.completions.create(
            messages=[{"role": "user", "content": f"question {i}"}], **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(prompt=f"prompt {i}", **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices
               and c.choices[0].finish_reason]
    usage = chunks[-1].usage.completion_tokens if chunks[-1].usage else None
    return text, usage, reasons[-1] if reasons else None


def run_all(app: str, during: Any = None) -> list[tuple[str, int | None, str | None]]:
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream, app, i, i % 2 == 1) for i in range(STREAMS)]
        if during is not None:
            during()
        return [f.result() for f in futures]


def test_killing_a_replica_mid_stream_leaves_every_stream_complete_and_identical(
        app: str) -> None:
    import ray

    wait_for_replicas(APP, 2)
    baseline = run_all(app)
    assert all(usage == MAX_TOKENS and reason == "length" for _, usage, reason in baseline)
    killed: list[dict[str, Any]] = []

    def kill_the_busiest() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            busy = [s for s in replica_stats(APP).values() if s["running"]]
            if sum(s["running"] for s in busy) == STREAMS:
                break
            time.sleep(0.05)
        time.sleep(0.4)  # well into the streams: ~40 tokens sent
        victim = max(busy, key=lambda s: s["running"])
        ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)
        killed.append(victim)

    faulted = run_all(app, kill_the_busiest)
    assert killed and killed[0]["running"] >= 1  # streams really were cut
    assert faulted == baseline  # same text, usage counted once, same finish
    # Ray replaces the replica; the app keeps serving
    wait_for_replicas(APP, 2)
    with httpx.Client(base_url=app, timeout=30) as http:
        assert http.get("/ready").json()["ready"] is True
        assert post(http, "sk-b").status_code == 200
