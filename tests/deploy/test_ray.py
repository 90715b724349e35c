"""servekit as a Ray Serve application, on one local Ray: the official openai client through
the ingress, the server's errors, metrics and usage, aborts on disconnect, and prefix-aware
routing across two fake replicas."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy._apps import deployed
from tests.deploy._apps import replica_stats as app_replica_stats

pytestmark = pytest.mark.slow

CONFIG = """
[server]
served_model_name = "fake"

[engine]
fake = true
fake_token_delay = 0.005

[usage]
data_dir = "data"

[ray]
app_name = "servekit-test"
replicas = 2
replica_cpus = 0.5
ingress_cpus = 0.5
routing_policy = "cache_aware"
routing_stats_period = 0.5
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the application's servekit.toml (its usage data dir is data/)."""
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def app(ray_serve: Any, home: Path) -> Iterator[str]:
    """The base URL of the application built from a servekit.toml (two fake replicas)."""
    with deployed(ray_serve, home, CONFIG, "servekit-test") as url:
        yield url


@pytest.fixture
def client(app: str) -> Any:
    import openai

    return openai.OpenAI(base_url=app + "/v1", api_key="unused", max_retries=0, timeout=30)


def replica_stats() -> dict[str, dict[str, Any]]:
    """Each engine replica's own routing stats (requests served, load), by replica id."""
    return app_replica_stats("servekit-test")


def test_openai_client_completions_chat_and_stream(client: Any) -> None:
    done = client.completions.create(model="fake", prompt="Hello", max_tokens=9)
    assert done.choices[0].text == "the quick"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == 6 and done.usage.completion_tokens == 9  # bos + 5 bytes

    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content == "the q"
    assert chat.usage.completion_tokens == 5

    chunks = list(client.completions.create(model="fake", prompt="Hello", max_tokens=20,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "the quick brown fox "
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20

    chat_stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=9, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices) \
        == "the quick"


def test_errors_keys_and_metrics_are_the_servers(client: Any, app: str) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hello", max_tokens=3)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="fake", prompt="Hello", max_tokens=10**6)
    assert bad.value.body["param"] == "max_tokens"
    with httpx.Client(base_url=app, timeout=30) as http:
        ids = http.post("/v1/completions", json={"model": "fake", "prompt": [1, 2, 999],
                                                  "max_tokens": 2})
        assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"
        assert http.get("/ready").json()["ready"] is True
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["fake"]
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "servekit_open_streams" in metrics.text or "servekit_" in metrics.text


def test_usage_records_reach_the_ledger(client: Any, home: Path) -> None:
    client.completions.create(model="fake", prompt="count me", max_tokens=7, user="u")
    db = home / "data" / "usage.db"
    deadline = time.monotonic() + 20
    rows: list[Any] = []
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                rows = conn.execute("SELECT model, completion_tokens FROM usage "
                                    "WHERE completion_tokens = 7").fetchall()
            if rows:
                break
        time.sleep(0.2)
    assert rows and rows[0][0] == "fake"


def test_a_client_that_leaves_aborts_its_request_on_the_replica(app: str) -> None:
    body = {"model": "fake", "prompt": "Hello", "max_tokens": 3000, "stream": True}  # ~15 s
    with httpx.Client(base_url=app, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert [line for line, _ in zip(lines, range(6), strict=False) if line]
        assert sum(s["running"] for s in replica_stats().values()) == 1
    deadline = time.monotonic() + 10
    while sum(s["running"] for s in replica_stats().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sum(s["running"] for s in replica_stats().values()) == 0  # aborted, not finished


def _served_by(prompt: str, client: Any) -> str:
    """The replica that served one completion (the one whose request count went up)."""
    before = {r: s["requests"] for r, s in replica_stats().items()}
    client.completions.create(model="fake", prompt=prompt, max_tokens=2)
    after = {r: s["requests"] for r, s in replica_stats().items()}
    grew = [r for r in after if after[r] > before.get(r, 0)]
    assert len(grew) == 1, (before, after)
    return grew[0]


def test_shared_prefix_lands_on_one_replica(client: Any, app: str) -> None:
    deadline = time.monotonic() + 30
    while len(replica_stats()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(replica_stats()) == 2
    # an earlier test's aborted stream may complete at the router after its replica stopped
    # it: wait until the router has nothing in flight (a count left there tips every new
    # prefix to the other replica)
    pattern = re.compile(r"^servekit_ray_replica_router_in_flight\{[^}]*\} (\S+)$", re.M)
    while any(float(v) for v in pattern.findall(httpx.get(app + "/metrics").text)):
        assert time.monotonic() < deadline + 30, pattern.findall(httpx.get(app + "/metrics").text)
        time.sleep(0.2)
    homes: dict[int, set[str]] = {}
    for group in range(8):
        prefix = f"system prompt {group}: " + "you are a helpful assistant. " * 8
        homes[group] = {_served_by(prefix + f"question {q}?", client) for q in range(3)}
    # a prefix sticks to its replica: the fake replicas report no KV blocks, so the router goes
    # by the prompts it sent each (and, one ingress, its exact in-flight counts, not a period-old
    # load report); round-robin or power-of-two would split nearly every group
    assert all(len(h) == 1 for h in homes.values()), homes
    # and different prefixes spread: not everything on one replica (1 in 128 by chance)
    assert len(set().union(*homes.values())) == 2, homes
