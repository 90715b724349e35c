"""Keys and RPM/TPM limits at the gateway's edge, shared through a real redis-server; the
caller's tenant and cache salt passed to replicas only with the gateway secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from servekit.gateway import create_gateway
from servekit.limit import ApiKey, KeyLimits, KeyStore, RedisStore
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from tests.asgi_server import serve_asgi
from tests.limit.conftest import RedisServer
from tests.server.cli_server import CliServer, cli_server

SECRET = "edge-secret"
RPM = 20
KEYS = [ApiKey("sk-a", tenant="a", rpm=RPM), ApiKey("sk-b", tenant="b", cache_salt="bee"),
        ApiKey("sk-t", tenant="t", tpm=1000)]


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.05)


def _post(url: str, key: str | None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", headers=headers, timeout=10,
                      json={"model": "fake", "prompt": "hi", "max_tokens": 2, **body})


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replica() -> Iterator[CliServer]:
    """One ``--fake`` replica for the module: every test builds its own gateway, keys and
    limits in front of it, and none stops it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
        with cli_server("--fake") as server:
            yield server


def test_two_gateways_sharing_redis_give_a_key_its_limit_in_total(
        redis: RedisServer, replica: CliServer) -> None:
    limits = [KeyLimits(store=RedisStore(redis.url)) for _ in range(2)]
    with ExitStack() as stack:
        gws = [stack.enter_context(serve_asgi(create_gateway(
            [replica.url], secret=SECRET, probe_interval=0.1, keys=KeyStore(KEYS),
            limits=lim))) for lim in limits]
        for gw in gws:
            _wait_ready(gw)
        assert _post(gws[0], None).status_code == 401
        assert _post(gws[1], "sk-wrong").status_code == 401
        start = time.monotonic()
        answers = [_post(gws[i % 2], "sk-a") for i in range(3 * RPM)]
        elapsed = time.monotonic() - start
        admitted = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        # at least 95 % of the limit, at most capacity + rate x T, over both gateways together
        assert 0.95 * RPM <= len(admitted) <= RPM + RPM / 60 * elapsed + 1e-9
        assert {r.status_code for r in refused} == {429}
        assert refused[0].headers["x-ratelimit-limit-requests"] == str(RPM)
        assert float(refused[0].headers["retry-after"]) > 0
        assert admitted[0].headers["x-ratelimit-limit-requests"] == str(RPM)
        assert all(_post(gws[1], "sk-b").status_code == 200 for _ in range(3))  # no limits
    assert [lim.open_reservations for lim in limits] == [0, 0]  # every one settled


def test_tokens_are_settled_with_what_the_stream_used(replica: CliServer) -> None:
    """A stream that stopped early gives back its unused reservation: a second request that
    fits only then is admitted."""
    limits = KeyLimits()
    app = create_gateway([replica.url], secret=SECRET, probe_interval=0.1,
                         keys=KeyStore(KEYS), limits=limits)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        deadline = time.monotonic() + 10
        while not app.state.fleet.encoders:  # the prompt is counted with the replica's tokens
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s = _post(gw, "sk-t", max_tokens=600, stream=True, stop=["brown"])
        assert s.status_code == 200 and s.text.rstrip().endswith("[DONE]")
        assert '"finish_reason":"stop"' in s.text  # after a few tokens of the 600
        assert limits.open_reservations == 0
        # 600 + 600 > 1000 had the first stream stayed charged at its reservation
        assert _post(gw, "sk-t", max_tokens=600).status_code == 200
        assert _post(gw, "sk-t", max_tokens=900).status_code == 429


class _Recording(FakeEngine):
    """A fake engine that records who each request ran for."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[tuple[str | None, str | None]] = []

    async def generate(self, prompt: Any, params: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.callers.append((kwargs.get("tenant"), kwargs.get("cache_salt")))
        async for out in super().generate(prompt, params, **kwargs):
            yield out


def test_tenant_and_cache_salt_reach_replicas_only_from_the_gateway() -> None:
    engine = _Recording()
    replica_app = create_app(engine, config=ServerConfig(model_names=("fake",),
                                                         gateway_secret=SECRET))
    with serve_asgi(replica_app) as rep:
        gw_app = create_gateway([rep], secret=SECRET, probe_interval=0.1, keys=KeyStore(KEYS))
        with serve_asgi(gw_app) as gw:
            _wait_ready(gw)
            assert _post(gw, "sk-a").status_code == 200
            # a client cannot pick its tenant or salt: the gateway drops x-servekit-* headers
            spoof = {"x-servekit-tenant": "evil", "x-servekit-cache-salt": "x",
                     "authorization": "Bearer sk-b"}
            assert httpx.post(gw + "/v1/completions", headers=spoof, timeout=10, json={
                "model": "fake", "prompt": "hi", "max_tokens": 2}).status_code == 200
        # nor, without the secret, straight at the replica
        for headers in ({"x-servekit-tenant": "evil"},
                        {"x-servekit-tenant": "evil", "x-servekit-gateway-secret": "wrong"}):
            assert httpx.post(rep + "/v1/completions", headers=headers, timeout=10, json={
                "model": "fake", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert engine.callers == [("a", KEYS[0].salt), ("b", "bee"), (None, None), (None, None)]


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_redis_outage_at_the_gateway_is_a_503_or_fails_open(
        redis: RedisServer, replica: CliServer, fail_open: bool) -> None:
    """Redis stops under a gateway: fail-closed answers 503 ``rate_limit_store_unavailable``
    (not a 429) with the outage's retry-after; fail-open serves without limit headers; no
    reservation is left open either way."""
    limits = KeyLimits(store=RedisStore(redis.url, timeout=0.5), fail_open=fail_open,
                       outage_retry_after=15)
    app = create_gateway([replica.url], secret=SECRET, probe_interval=0.1, keys=KeyStore(KEYS),
                         limits=limits)
    with serve_asgi(app) as gw:
        _wait_ready(gw)
        ok = _post(gw, "sk-a")
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == str(RPM)
        redis.stop()
        for _ in range(3):
            r = _post(gw, "sk-a")
            assert "x-ratelimit-remaining-requests" not in r.headers
            if fail_open:
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "rate_limit_store_unavailable"
                assert r.headers["retry-after"] == "15"
    assert limits.open_reservations == 0
