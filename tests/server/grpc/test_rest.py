"""The google.api.http REST mapping, mounted into the real HTTP app exactly as the lead will."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from servekit.server.grpc import rest_router
from servekit.server.grpc.rest import routes
from servekit.server.keys import ApiKey, KeyStore
from tests.asgi_server import serve_asgi

TEXT = "the quick brown fox jumps over the lazy dog "


@pytest.fixture(scope="module")
def http() -> Iterator[tuple[str, FakeEngine, Any]]:
    engine = FakeEngine()
    keys = KeyStore([ApiKey("sk-a", tenant="a"), ApiKey("sk-slow", tenant="b", rpm=1)])
    app = create_app(engine, keys=keys, metrics=False, config=ServerConfig(grace_period=1))
    service = app.state.servekit
    app.include_router(rest_router(service))  # the mount line for app.py
    with serve_asgi(app) as url:
        yield url, engine, service


AUTH = {"authorization": "Bearer sk-a"}


def test_routes_come_from_the_annotations() -> None:
    assert routes() == [("POST", "/v1/generate", "Generate"),
                        ("POST", "/v1/generate:stream", "GenerateStream")]


def test_unary_uses_the_proto3_json_mapping(http: tuple[str, FakeEngine, Any]) -> None:
    url, engine, service = http
    body = {"model": "fake", "prompt": "hi", "maxTokens": 5, "n": 2}
    r = httpx.post(url + "/v1/generate", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["text"] for c in data["choices"]] == [TEXT[:5]] * 2
    assert data["choices"][0]["finishReason"] == "FINISH_REASON_LENGTH"
    assert data["usage"]["completionTokens"] == 10
    # the proto field names are accepted too
    chat = {"model": "fake", "chat": {"messages": [{"role": "user", "content": "x"}]},
            "max_tokens": 3}
    assert httpx.post(url + "/v1/generate", json=chat, headers=AUTH).json()[
        "choices"][0]["text"] == TEXT[:3]
    assert engine.num_used_blocks == 0 and service.limits.open_reservations == 0


def test_stream_is_ndjson_of_chunks(http: tuple[str, FakeEngine, Any]) -> None:
    url, engine, _ = http
    body = {"model": "fake", "promptTokenIds": {"ids": [1, 2]}, "maxTokens": 4}
    with httpx.stream("POST", url + "/v1/generate:stream", json=body, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(line.get("text", "") for line in lines) == TEXT[:4]
    assert lines[0]["model"] == "fake" and lines[-1]["final"] is True
    assert lines[-1]["usage"] == {"promptTokens": 2, "completionTokens": 4, "totalTokens": 6}
    assert engine.num_used_blocks == 0


@pytest.mark.parametrize(("body", "headers", "status", "field"), [
    ({"model": "fake", "prompt": "x", "maxTokens": -3}, AUTH, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "temperature": "hot"}, AUTH, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "bogus": 1}, AUTH, 400, "bogus"),
    ({"model": "fake", "chat": {"messages": [{"rolle": "user"}]}}, AUTH, 400,
     "chat.messages[0].rolle"),
    ({"model": "fake", "prompt": "x", "maxTokens": 1.5}, AUTH, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, AUTH, 404, None),
    ({"model": "fake", "chat": {"messages": [{"role": "user", "content": "x"}]},
      "tools": [{"type": "function", "function": {"name": "f"}}],
      "toolChoice": {"function": "g"}}, AUTH, 400, "tool_choice.function.name"),
    ({"model": "fake", "prompt": "x", "responseFormat": {
        "type": "json_schema", "jsonSchema": {"name": "s", "schema": "{oops"}}}, AUTH, 400,
     "response_format.json_schema.schema"),
])
def test_errors_are_rpc_status_json(http: tuple[str, FakeEngine, Any], body: dict[str, Any],
                                    headers: dict[str, str], status: int,
                                    field: str | None) -> None:
    url, _, _ = http
    for path in ("/v1/generate", "/v1/generate:stream"):
        r = httpx.post(url + path, json=body, headers=headers)
        assert r.status_code == status, r.text
        error = r.json()
        assert error["code"] == {400: 3, 401: 16, 404: 5}[status] and error["message"]
        if field is not None:
            bad = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))
            assert bad["fieldViolations"][0]["field"] == field


def test_the_app_authenticates_the_routes(http: tuple[str, FakeEngine, Any]) -> None:
    url, _, _ = http
    for path in ("/v1/generate", "/v1/generate:stream"):
        for headers in ({}, {"authorization": "Bearer sk-nope"}):
            r = httpx.post(url + path, json={"model": "fake", "prompt": "x"}, headers=headers)
            assert r.status_code == 401


def test_rate_limit_headers(http: tuple[str, FakeEngine, Any]) -> None:
    url, _, service = http
    body = {"model": "fake", "prompt": "x", "maxTokens": 1}
    slow = {"authorization": "Bearer sk-slow"}
    ok = httpx.post(url + "/v1/generate", json=body, headers=slow)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "1"
    limited = httpx.post(url + "/v1/generate", json=body, headers=slow)
    assert limited.status_code == 429 and limited.json()["code"] == 8
    assert int(limited.headers["retry-after"]) >= 1 and "retry-after-ms" in limited.headers
    assert service.limits.open_reservations == 0


def test_an_unmappable_http_rule_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from google.api import annotations_pb2

    from servekit.server.grpc import rest

    rule = SimpleNamespace(WhichOneof=lambda _: "get", get="/v1/things", body="")
    options = SimpleNamespace(HasExtension=lambda _: True, Extensions={annotations_pb2.http: rule})
    method = SimpleNamespace(full_name="servekit.v1.Generation.List", name="List",
                             GetOptions=lambda: options)
    monkeypatch.setattr(rest, "_SERVICE", SimpleNamespace(methods=[method]))
    with pytest.raises(rest.UnsupportedHttpRuleError, match=r"Generation\.List"):
        rest.routes()
