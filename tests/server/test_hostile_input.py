"""Hostile values that are valid JSON: lone surrogates, numbers that underflow the engine's dtype."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.conftest import Running

PROMPT = "ROMEO \ud800 x"


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` as ASCII JSON (a lone surrogate travels as a ``\\ud800`` escape)."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": PROMPT}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", PROMPT]}, "prompt.[1]"),
    ("/v1/completions", {"prompt": "ok", "stop": ["\udfff"]}, "stop.[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]},
     "messages.[0].content"),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": PROMPT}]}]},
     "messages.[0].content.[1].text"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(fake_server: Running, path: str,
                                                    body: dict[str, Any], param: str) -> None:
    r = post(fake_server.url + path, {"model": "fake", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]


def test_a_lone_surrogate_in_the_model_name_is_still_a_clean_404(fake_server: Running) -> None:
    r = post(fake_server.url + "/v1/completions",
             {"model": "m\ud800", "prompt": "x", "max_tokens": 2})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == "model"
