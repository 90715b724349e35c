"""The replica side: the KV-event feed, and the info / kv_events endpoints behind the secret."""

from __future__ import annotations

import httpx
import pytest

from servekit.gateway.tokens import PromptEncoder
from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from servekit.server.replica_api import GATEWAY_SECRET_HEADER, KVEventFeed
from tests.asgi_server import serve_asgi
from tests.server.cli_server import cli_server

SECRET = "s3cret"


def test_feed_numbers_events_and_keeps_the_last_ones() -> None:
    feed = KVEventFeed(capacity=2)
    feed.on_kv_event(BlockStored((1, 2), None, tuple(range(8)), 4))
    feed.on_kv_event(BlockRemoved((1,)))
    feed.on_kv_event(AllBlocksCleared())
    assert feed.next_seq == 3
    # event 0 fell out of the buffer: a reader after -1 sees the gap (first seq is 1)
    assert [e["seq"] for e in feed.since(-1)] == [1, 2]
    assert feed.since(1) == [{"type": "cleared", "block_hashes": [], "seq": 2}]
    assert feed.since(2) == []


@pytest.mark.parametrize("secret, sent, status", [(None, SECRET, 404), (SECRET, None, 403),
                                                 (SECRET, "wrong", 403), (SECRET, SECRET, 200)])
def test_endpoints_need_the_configured_secret(secret: str | None, sent: str | None,
                                              status: int) -> None:
    app = create_app(FakeEngine(), config=ServerConfig(model_names=("fake",),
                                                       gateway_secret=secret))
    headers = {GATEWAY_SECRET_HEADER: sent} if sent else {}
    with serve_asgi(app) as url:
        for path in ("/servekit/info", "/servekit/kv_events"):
            assert httpx.get(url + path, headers=headers).status_code == status


def test_fake_replica_info_and_load() -> None:
    app = create_app(FakeEngine(), config=ServerConfig(model_names=("fake",),
                                                       gateway_secret=SECRET))
    with serve_asgi(app) as url:
        h = {GATEWAY_SECRET_HEADER: SECRET}
        info = httpx.get(url + "/servekit/info", headers=h).json()
        assert info["models"] == ["fake"] and info["tokenizer"]["kind"] == "bytes"
        doc = httpx.get(url + "/servekit/kv_events", headers=h,
                        params={"after": -1, "timeout": 0.05}).json()
        assert doc["events"] == [] and doc["load"] == {"running": 0, "waiting": 0,
                                                       "kv_usage": 0.0}
        assert doc["epoch"] == info["epoch"]
        bad = httpx.get(url + "/servekit/kv_events", headers=h, params={"after": -5})
        assert bad.status_code == 400 and "after" in bad.text


def test_demo_replica_events_carry_the_gateways_block_hashes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real engine's stored blocks are exactly the chained hashes the gateway computes from
    the replica's own tokenizer files (same block size, same algorithm, no salt)."""
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    with cli_server("--kv-cache-mb", "16") as server:
        h = {GATEWAY_SECRET_HEADER: SECRET}
        info = httpx.get(server.url + "/servekit/info", headers=h, timeout=30).json()
        assert info["tokenizer"]["kind"] == "files" and info["block_size"] > 0
        encoder = PromptEncoder(info)
        prompt = "ROMEO: " + "But soft, what light through yonder window breaks? " * 6
        ids = encoder.prompt_ids(prompt)
        expected = encoder.block_hashes(ids)
        assert len(expected) >= 2
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": info["models"][0], "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        doc = httpx.get(server.url + "/servekit/kv_events", headers=h,
                        params={"after": -1, "timeout": 2}).json()
        stored = [x for e in doc["events"] if e["type"] == "stored" for x in e["block_hashes"]]
        assert stored[:len(expected)] == expected
        assert [e["seq"] for e in doc["events"]] == list(range(len(doc["events"])))
