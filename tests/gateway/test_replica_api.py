"""The replica side: the KV-event feed, and the info / kv_events endpoints behind the secret."""

from __future__ import annotations

import json

import httpx
import pytest

from servekit.gateway.tokens import PromptEncoder
from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from servekit.protocol.replica import EXTENSIONS_HEADER, GATEWAY_SECRET_HEADER
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from servekit.server.replica_api import KVEventFeed
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


def _events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


def _stream(url: str, headers: dict[str, str], path: str = "/v1/completions",
            **body: object) -> httpx.Response:
    payload = {"model": "fake", "max_tokens": 8, "stream": True, **body}
    if path.endswith("chat/completions"):
        payload.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        payload.setdefault("prompt", "hello")
    return httpx.post(url + path, headers=headers, json=payload, timeout=10)


def _split(events: list[str]) -> tuple[list[int], list[str]]:
    """The token ids of the servekit comment lines, and the events less those lines."""
    ids: list[int] = []
    rest = []
    for event in events:
        lines = event.split("\n")
        for line in lines:
            if line.startswith(": servekit "):
                doc = json.loads(line[len(": servekit "):])
                assert doc["index"] == 0
                ids += doc["token_ids"]
        kept = "\n".join(x for x in lines if not x.startswith(":"))
        if kept:
            rest.append(kept)
    return ids, rest


@pytest.mark.parametrize("sent", [None, "wrong", SECRET])
def test_token_ids_only_for_the_trusted_gateway(sent: str | None) -> None:
    app = create_app(FakeEngine(), config=ServerConfig(model_names=("fake",),
                                                       gateway_secret=SECRET))
    headers = {EXTENSIONS_HEADER: "token_ids"}
    if sent:
        headers[GATEWAY_SECRET_HEADER] = sent
    with serve_asgi(app) as url:
        plain = _stream(url, {})
        r = _stream(url, headers)
    assert r.status_code == 200
    ids, rest = _split(_events(r.text))
    if sent == SECRET:
        assert r.headers[EXTENSIONS_HEADER] == "token_ids"
        assert len(ids) == 8 and "".join(map(chr, ids)) == _text(rest)
    else:
        assert EXTENSIONS_HEADER not in r.headers and ": servekit" not in r.text and ids == []
    # less the comment lines, the stream is exactly what a client gets (ids aside)
    assert [_strip_id(e) for e in rest] == [_strip_id(e) for e in _events(plain.text)]


def _strip_id(event: str) -> str:
    if event == "data: [DONE]":
        return event
    doc = json.loads(event[len("data: "):])
    doc.pop("id"), doc.pop("created")
    return json.dumps(doc)


def _text(events: list[str]) -> str:
    out = ""
    for e in events:
        if e != "data: [DONE]":
            choice = json.loads(e[len("data: "):])["choices"]
            if choice:
                out += choice[0].get("text") or choice[0].get("delta", {}).get("content") or ""
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_resume_continues_a_cut_stream_only_for_the_gateway(path: str) -> None:
    app = create_app(FakeEngine(), config=ServerConfig(model_names=("fake",),
                                                       gateway_secret=SECRET))
    trusted = {GATEWAY_SECRET_HEADER: SECRET, EXTENSIONS_HEADER: "token_ids"}
    options = {"stream_options": {"include_usage": True}}
    with serve_asgi(app) as url:
        full = _stream(url, trusted, path, **options)
        ids, events = _split(_events(full.text))
        first = json.loads(events[0][len("data: "):])
        resume = {"output_token_ids": ids[:3], "request_id": first["id"],
                  "created": first["created"]}
        refused = _stream(url, {}, path, servekit_resume=resume)
        wrong = _stream(url, {GATEWAY_SECRET_HEADER: "nope"}, path, servekit_resume=resume)
        two = _stream(url, trusted, path, n=2, servekit_resume=resume)
        # choice 0 cut after 3 tokens; choice 1 had finished (all its 8)
        several = _stream(url, trusted, path, n=2, servekit_resume={"choices": [
            {"output_token_ids": ids[:3]},
            {"output_token_ids": ids, "finish_reason": "length"}]}, **options)
        short = _stream(url, trusted, path, n=2, servekit_resume={"choices": [
            {"output_token_ids": ids[:3]}]})
        too_many = _stream(url, trusted, path, servekit_resume={"output_token_ids": ids})
        r = _stream(url, trusted, path, servekit_resume=resume, **options)
    for bad in (refused, wrong):
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "servekit_resume"
    assert two.status_code == 400 and two.json()["error"]["param"] == "servekit_resume"
    assert short.status_code == 400
    assert short.json()["error"]["param"] == "servekit_resume.choices"
    assert several.status_code == 200
    more2, rest2 = _split(_events(several.text))
    assert more2 == ids[3:]  # only the unfinished choice goes on
    docs2 = [json.loads(e[len("data: "):]) for e in rest2 if e != "data: [DONE]"]
    assert {c["index"] for d in docs2 for c in d["choices"]} == {0}
    assert docs2[-1]["usage"]["completion_tokens"] == 16  # both choices, every output once
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "servekit_resume.output_token_ids"
    assert r.status_code == 200
    more, rest = _split(_events(r.text))
    assert more == ids[3:]
    docs = [json.loads(e[len("data: "):]) for e in rest if e != "data: [DONE]"]
    assert {(d["id"], d["created"]) for d in docs} == {(first["id"], first["created"])}
    assert "role" not in r.text  # no opening chunk: the cut stream sent it
    assert _text(events[:4 if "chat" in path else 3]) + _text(rest) == _text(events)
    assert docs[-1]["usage"]["completion_tokens"] == 8  # billed for every output once
