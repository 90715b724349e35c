"""A rate-limit store outage (a real redis-server, stopped) is not reported as a rate limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servekit.limit import RedisStore
from servekit.server import ApiKey, FakeEngine, KeyStore, create_app
from servekit.server.app import ServerConfig
from servekit.server.ratelimit import KeyLimits
from tests.limit.conftest import RedisServer
from tests.server.conftest import serve

AUTH = {"authorization": "Bearer sk-a"}
BODY = {"model": "fake", "prompt": "hello", "max_tokens": 2}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_store_outage_is_a_503_or_fails_open_and_is_counted(redis: RedisServer,
                                                              fail_open: bool) -> None:
    keys = KeyStore([ApiKey("sk-a", tenant="a", rpm=100_000, tpm=10_000_000)])
    config = ServerConfig(rate_limit_fail_open=fail_open, rate_limit_outage_retry_after=15)
    limits = KeyLimits(store=RedisStore(redis.url, timeout=0.5), fail_open=fail_open,
                       outage_retry_after=config.rate_limit_outage_retry_after)
    app = create_app(FakeEngine(max_model_len=256), keys=keys, limits=limits, config=config)
    with serve(app) as server:
        ok = httpx.post(server.url + "/v1/completions", json=BODY, headers=AUTH)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "100000"
        assert server.metric("rate_limit_store_errors") == 0
        redis.stop()
        for _ in range(3):
            r = httpx.post(server.url + "/v1/completions", json=BODY, headers=AUTH)
            if fail_open:
                assert r.status_code == 200, r.text
                assert "x-ratelimit-remaining-requests" not in r.headers
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "rate_limit_store_unavailable"
                assert r.headers["retry-after"] == "15"
                assert "x-ratelimit-remaining-requests" not in r.headers
        assert server.metric("rate_limit_store_errors") == 3
        assert server.metric("rate_limit_reservations") == 0


def test_the_cli_and_the_config_file_reach_the_fail_open_switch(tmp_path: Any) -> None:
    from servekit.server.cli import build_parser
    from servekit.server.config import apply_config

    args = apply_config(build_parser().parse_args(
        ["serve", "--rate-limit-fail-open", "--rate-limit-outage-retry-after", "30"]))
    assert args.rate_limit_fail_open is True and args.rate_limit_outage_retry_after == 30.0
    defaults = apply_config(build_parser().parse_args(["serve"]))
    assert defaults.rate_limit_fail_open is False
    assert defaults.rate_limit_outage_retry_after == 10.0
    config = tmp_path / "servekit.toml"
    config.write_text("[limits]\nfail_open = true\noutage_retry_after = 20.0\n"
                      "[metrics]\nstyle = \"vllm\"\n")
    args = apply_config(build_parser().parse_args(["serve", "--config", str(config)]))
    assert args.rate_limit_fail_open is True and args.rate_limit_outage_retry_after == 20.0
    assert args.metrics_style == "vllm"
