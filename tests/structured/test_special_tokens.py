"""Tool tags that are special tokens (Mistral's ``[TOOL_CALLS]``, Llama 3's ``<|python_tag|>``)
reach the parsers: the server decodes such a request's output with ``skip_special_tokens=False``.

The model is a real tokenizer (tags added as special tokens) and a tiny scripted Llama that
writes the family's tag and then a call (:mod:`tests.structured.scripted_model`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from servekit.client.grpc import GrpcClient
from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.engine.wire import params_from_wire, params_to_wire
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.server import create_app
from servekit.server.app import ServerConfig
from servekit.server.grpc.convert import sampling_params
from servekit.structured.tool_parsers import tool_parser_for
from tests.server.conftest import Running, serve
from tests.server.grpc.conftest import serve as serve_grpc
from tests.structured.scripted_model import BODIES, TAGS, TEMPLATES, build_model_dir

MODEL = "scripted"
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
USER = [{"role": "user", "content": "add two and three"}]


@pytest.fixture(scope="module", params=["mistral", "llama3"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp(family), family)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Running]:
    engine = AsyncEngine(LLMEngine(str(model_dir), config=EngineConfig(num_blocks=64)))
    app = create_app(engine, config=ServerConfig(model_names=(MODEL,)))
    with serve(app) as running:
        yield running


def post(server: Running, path: str, **body: Any) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60,
                      json={"model": MODEL, "max_tokens": 8, **body})


def test_the_templates_pick_the_formats_that_need_special_tokens() -> None:
    assert tool_parser_for(TEMPLATES["mistral"]).name == "mistral"
    assert tool_parser_for(TEMPLATES["llama3"]).name == "llama3_json"
    assert all(tool_parser_for(TEMPLATES[f]).needs_special_tokens for f in TEMPLATES)
    assert not tool_parser_for(None).needs_special_tokens  # Hermes' tags are plain text


def test_the_engine_honours_skip_special_tokens_per_request(model_dir: Path,
                                                             family: str) -> None:
    engine = LLMEngine(str(model_dir), config=EngineConfig(num_blocks=32))
    kept, skipped = engine.generate(["hi [/INST]"] * 2, [
        SamplingParams(max_tokens=8, temperature=0, skip_special_tokens=False),
        SamplingParams(max_tokens=8, temperature=0)])
    assert kept.text == TAGS[family] + BODIES[family]  # end of sequence is never text
    assert skipped.text == BODIES[family]


def test_completions_take_skip_special_tokens(server: Running, family: str) -> None:
    prompt = "hi [/INST]"
    kept = post(server, "/v1/completions", prompt=prompt, temperature=0,
                skip_special_tokens=False, echo=True).json()
    assert kept["choices"][0]["text"] == prompt + TAGS[family] + BODIES[family]
    plain = post(server, "/v1/completions", prompt=prompt, temperature=0).json()
    assert plain["choices"][0]["text"] == BODIES[family]


def test_a_call_behind_a_special_tag_becomes_tool_calls(server: Running) -> None:
    out = post(server, "/v1/chat/completions", messages=USER, tools=[ADD],
               temperature=0).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", out
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    calls: dict[int, dict[str, str]] = {}
    content = ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": USER, "tools": [ADD], "temperature": 0,
            "max_tokens": 8, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                content += delta.get("content") or ""
                for part in delta.get("tool_calls") or ():
                    entry = calls.setdefault(part["index"], {"name": "", "arguments": ""})
                    entry["name"] += part.get("function", {}).get("name") or ""
                    entry["arguments"] += part.get("function", {}).get("arguments") or ""
    assert content == ""
    assert calls == {0: {"name": "add", "arguments": call["function"]["arguments"]}}


def test_a_mistral_call_needs_the_tag_kept(server: Running, family: str) -> None:
    """The request's own ``skip_special_tokens: true`` wins: the tag is gone, so a Mistral
    model's call is plain text (which is what every request got before)."""
    out = post(server, "/v1/chat/completions", messages=USER, tools=[ADD], temperature=0,
               skip_special_tokens=True).json()
    message = out["choices"][0]["message"]
    if family == "mistral":
        assert "tool_calls" not in message and message["content"] == BODIES["mistral"]
    else:  # Llama 3's parser also takes a bare JSON call
        assert message["tool_calls"][0]["function"]["name"] == "add"


def test_without_tools_special_tokens_are_skipped(server: Running, family: str) -> None:
    out = post(server, "/v1/chat/completions", messages=USER, temperature=0).json()
    assert out["choices"][0]["message"]["content"] == BODIES[family]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_non_boolean_skip_special_tokens_is_a_400(server: Running, path: str) -> None:
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": USER}
    r = post(server, path, skip_special_tokens="no", **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "skip_special_tokens"


def test_grpc_requests_keep_the_tag_for_tools(model_dir: Path, family: str) -> None:
    engine = AsyncEngine(LLMEngine(str(model_dir), config=EngineConfig(num_blocks=64)))
    with serve_grpc(engine) as served, GrpcClient(served.address) as client:
        name = str(engine.model_name)
        out = client.chat(name, USER, tools=[ADD], temperature=0, max_tokens=8)
        [call] = out.choices[0].message.tool_calls
        assert (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
        assert out.choices[0].finish_reason == "tool_calls"
        kept = client.complete(name, "hi [/INST]", temperature=0, max_tokens=8,
                               skip_special_tokens=False)
        assert kept.choices[0].text == TAGS[family] + BODIES[family]


def test_sampling_params_carry_the_flag() -> None:
    params = SamplingParams(skip_special_tokens=False)
    assert params_from_wire(params_to_wire(params)).skip_special_tokens is False
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(skip_special_tokens="no")  # type: ignore[arg-type]
    assert info.value.param == "skip_special_tokens"
    req = pb.GenerateRequest(prompt="x")
    assert sampling_params(req, 4, None).skip_special_tokens is True
    assert sampling_params(req, 4, None, keep_special_tokens=True).skip_special_tokens is False
    req.skip_special_tokens = True  # the request's own value wins
    assert sampling_params(req, 4, None, keep_special_tokens=True).skip_special_tokens is True


def _engine(path: str, hooks: Any = None) -> AsyncEngine:
    """An engine-core factory (``hooks``: the core's metrics hooks)."""
    return AsyncEngine(LLMEngine(path, config=EngineConfig(num_blocks=32), hooks=hooks))


@pytest.mark.slow  # starts an engine-core process per family
def test_the_engine_process_carries_the_flag(model_dir: Path, family: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``--engine-process``: the params cross the wire with ``skip_special_tokens``."""
    from servekit.engine.core_client import EngineCoreClient
    from tests.structured.scripted_model import build_tokenizer

    root = str(Path(__file__).resolve().parents[2])  # the core imports this module's factory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))

    async def run() -> list[str]:
        client = EngineCoreClient(functools.partial(_engine, str(model_dir)),
                                  tokenizer=build_tokenizer(family), log_level="warning")
        texts = []
        async with client:
            for skip in (False, True):
                params = SamplingParams(max_tokens=8, temperature=0, skip_special_tokens=skip)
                texts.append("".join([o.new_text async for o in
                                      client.generate("hi [/INST]", params)]))
        return texts

    assert anyio.run(run) == [TAGS[family] + BODIES[family], BODIES[family]]
