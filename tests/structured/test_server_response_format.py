"""``response_format`` on the real server with the demo model, through the official client."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import Running

MODEL = "servekit-demo"


class Character(BaseModel):
    name: str = Field(max_length=16)
    act: int = Field(ge=1, le=5)
    mood: str = Field(max_length=10)


def test_openai_parse_with_a_pydantic_model(server: Running) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for temperature in (0.0, 1.0):
        done = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Who speaks?"}],
            response_format=Character, max_tokens=200, temperature=temperature)
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Character)


def test_json_object_on_completions(server: Running) -> None:
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "ROMEO:", "max_tokens": 120, "temperature": 0,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)


@pytest.mark.parametrize(("fmt", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
])
def test_bad_response_format_is_a_400_naming_the_field(server: Running, fmt: object,
                                                       param: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_sdk_parse_sync_and_async(server: Running) -> None:
    import anyio

    from servekit.client import AsyncClient, Client

    with Client(server.url) as c:
        got = c.parse(MODEL, [{"role": "user", "content": "Who?"}], Character,
                      max_tokens=200, temperature=0)
    assert isinstance(got, Character)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}}, "required": ["n"]}

    async def main() -> Any:
        async with AsyncClient(server.url) as ac:
            return await ac.parse(MODEL, [{"role": "user", "content": "n?"}], schema,
                                  max_tokens=50, temperature=0)

    value = anyio.run(main)
    assert isinstance(value, dict) and 0 <= value["n"] <= 9


def test_structural_tag_response_format(server: Running) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}}, "required": ["n"]}
    fmt = {"type": "structural_tag", "triggers": ["<n>"], "at_least_one": True,
           "structures": [{"begin": "<n>", "schema": schema, "end": "</n>"}]}
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "ROMEO:", "max_tokens": 60, "temperature": 0,
        "response_format": fmt})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.startswith("<n>")
    bodies = re.findall(r"<n>(.*?)</n>", text, re.S)
    assert bodies
    for body in bodies:
        assert 0 <= json.loads(body)["n"] <= 9
    bad = {**fmt, "structures": [{"begin": "<n>", "schema": {"type": "wat"}, "end": "</n>"}]}
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "ROMEO:", "response_format": bad})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.structures[0].schema"
