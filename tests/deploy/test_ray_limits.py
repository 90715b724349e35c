"""Rate limits across two ingress replicas on a local Ray: sharing a real redis-server as their
limiter store, they admit a key's limit in total, not per replica."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.deploy._apps import deployed
from tests.limit.conftest import RedisServer

pytestmark = pytest.mark.slow

APP = "servekit-limits"
RPM = 20


@pytest.fixture(scope="module")
def app(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = RedisServer()
    home = tmp_path_factory.mktemp("limits")
    (home / "keys.json").write_text(json.dumps({"keys": [
        {"key": "sk-a", "tenant": "a", "rpm": RPM}, {"key": "sk-b", "tenant": "b"}]}))
    config = f"""
[server]
api_keys = "{home / 'keys.json'}"

[engine]
fake = true

[limits]
store = "{redis.url}"

[ray]
ingress_replicas = 2
replica_cpus = 0.25
ingress_cpus = 0.25
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
