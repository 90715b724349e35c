"""``response_format``, ``tools`` and ``tool_choice`` over gRPC on a real server with the demo model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import grpc
import jsonschema
import pytest
from pydantic import BaseModel, Field

from servekit.client import BadRequestError
from servekit.client.grpc import AsyncGrpcClient, GrpcClient
from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc
from servekit.server.cli import DEMO_MODEL
from tests.server.grpc.conftest import Served, serve

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
       "parameters": {"type": "object", "properties": {
           "a": {"type": "integer", "minimum": 0, "maximum": 99},
           "b": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}}}
TOOLS = [ADD, WEATHER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
Small = Annotated[int, {"minimum": 0, "maximum": 99}]
USER = [{"role": "user", "content": "Add two and three."}]
NAMED = {"type": "function", "function": {"name": "add"}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
SCHEMA_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


class Character(BaseModel):
    name: str = Field(max_length=16)
    act: int = Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(num_blocks=256)))
    with serve(engine) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: Served) -> Iterator[GrpcClient]:
    with GrpcClient(server.address) as c:
        yield c


def model(server: Served) -> str:
    return str(server.engine.model_name)


def check_call(name: str, arguments: str, want: str | None = None) -> None:
    assert name in SCHEMAS and (want is None or name == want)
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_json_schema_output_validates_unary_streamed_and_on_a_session(
        server: Served, client: GrpcClient) -> None:
    for seed, temperature in enumerate((0.0, 1.0, 1.0)):
        kw: dict[str, Any] = {"response_format": SCHEMA_FORMAT, "max_tokens": 120,
                              "temperature": temperature, "seed": seed}
        whole = client.chat(model(server), [{"role": "user", "content": "Who?"}], **kw)
        assert whole.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(whole.text), PERSON)
        done = client.complete(model(server), "ROMEO:", **kw)
        assert done.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(done.text), PERSON)
        streamed = "".join(c.text for c in client.stream_complete(model(server), "ROMEO:", **kw))
        assert streamed == done.text  # same seed, same constrained draws
        with client.session() as session:
            call = session.complete(model(server), "ROMEO:", **kw)
            assert call.result().text == done.text
    server.wait_idle()


def test_json_object(server: Served, client: GrpcClient) -> None:
    done = client.chat(model(server), [{"role": "user", "content": "hi"}], max_tokens=100,
                       response_format={"type": "json_object"}, temperature=0)
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(done.text), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert done.choices[0].finish_reason == "length" and done.text.startswith("{")


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_forced_calls_parse_and_validate_whole_and_streamed(
        server: Served, client: GrpcClient, choice: Any) -> None:
    want = "add" if isinstance(choice, dict) else None
    for seed, temperature in enumerate((0.0, 1.0, 1.0)):
        kw = {"tools": TOOLS, "tool_choice": choice, "temperature": temperature, "seed": seed}
        whole = client.chat(model(server), USER, **kw)
        out = whole.choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content == ""
        [call] = out.message.tool_calls
        assert call.id.startswith("call_")
        check_call(call.name, call.arguments, want)
        chunks = list(client.stream_chat(model(server), USER, **kw))
        fragments: dict[int, list[str]] = {}
        names: dict[int, str] = {}
        for chunk in chunks:
            for c in chunk.choices:
                assert c.message.content == ""
                for part in c.message.tool_calls:
                    fragments.setdefault(part.index, []).append(part.arguments)
                    names[part.index] = part.name or names.get(part.index, "")
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert list(fragments) == [0]
        # the streamed fragments concatenate to exactly the unary call's arguments, and the
        # arguments came in pieces as the model wrote them
        assert (names[0], "".join(fragments[0])) == (call.name, call.arguments)
        assert sum(bool(f) for f in fragments[0]) > 1
        with client.session() as session:
            collected = session.chat(model(server), USER, **kw).result()
        # a session's result joins the streamed pieces into one call
        [same] = collected.choices[0].message.tool_calls
        assert (same.name, same.arguments) == (call.name, call.arguments) and same.id
        assert collected.choices[0].finish_reason == "tool_calls"
    server.wait_idle()


def test_tool_results_go_back_as_messages(server: Served, client: GrpcClient) -> None:
    first = client.chat(model(server), USER, tools=TOOLS, tool_choice=NAMED, temperature=0)
    [call] = first.choices[0].message.tool_calls
    messages = [*USER, {"role": "assistant", "content": None,
                        "tool_calls": [call.to_json()]},
                {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    after = client.chat(model(server), messages, tools=TOOLS, tool_choice="none",
                        max_tokens=8, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")
    assert not after.choices[0].message.tool_calls
    assert after.usage is not None and after.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_auto_and_none_leave_plain_text_alone(server: Served, client: GrpcClient) -> None:
    plain = client.chat(model(server), USER, max_tokens=8, temperature=0)
    none = client.chat(model(server), USER, tools=TOOLS, tool_choice="none", max_tokens=8,
                       temperature=0)
    assert none.text == plain.text and not none.choices[0].message.tool_calls
    auto = client.chat(model(server), USER, tools=TOOLS, max_tokens=8, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _raw(server: Served, request: Any) -> grpc.RpcError:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, timeout=30)
    return info.value


def _chat_request(**fields: Any) -> Any:
    req = pb.GenerateRequest(**fields)
    req.chat.messages.add(role="user", content="hi")
    return req


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools[0].function.parameters"),
    ({"tools": [ADD, {"type": "retrieval", "function": {"name": "g"}}]}, "tools[1].type"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_bad_fields_are_invalid_argument_naming_the_field(
        server: Served, client: GrpcClient, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        client.chat(model(server), USER, **fields)
    assert info.value.param == param, info.value


@pytest.mark.parametrize(("request_", "param"), [
    (_chat_request(response_format=pb.ResponseFormat(
        type="json_schema", json_schema=pb.JsonSchemaFormat(name="x", schema="{not json"))),
     "response_format.json_schema.schema"),
    (_chat_request(tools=[pb.Tool(type="function", function=pb.FunctionDefinition(
        name="f", parameters="[1,"))]), "tools[0].function.parameters"),
    (pb.GenerateRequest(prompt="ROMEO:", tools=[pb.Tool(
        type="function", function=pb.FunctionDefinition(name="f"))]), "tools"),
])
def test_bad_json_text_and_tools_without_chat(server: Served, request_: Any, param: str) -> None:
    request_.model = model(server)
    err = _raw(server, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param in err.details()


def test_bad_tool_messages_name_the_field(server: Served, client: GrpcClient) -> None:
    with pytest.raises(BadRequestError) as info:
        client.chat(model(server), [*USER, {"role": "tool", "content": "5"}])
    assert info.value.param == "chat.messages[1].tool_call_id"
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "[1, 2]"}}
    with pytest.raises(BadRequestError) as info:
        client.chat(model(server), [*USER, {"role": "assistant", "content": "",
                                            "tool_calls": [call]}])
    assert info.value.param == "chat.messages[1].tool_calls[0].function.arguments"
    with pytest.raises(BadRequestError) as info:
        client.chat(model(server), [{"role": "user", "content": "x", "tool_calls": [call]}])
    assert info.value.param == "chat.messages[0].tool_calls"
    server.wait_idle()


def test_parse_sync_and_async_over_grpc(server: Served, client: GrpcClient) -> None:
    got = client.parse(model(server), [{"role": "user", "content": "Who?"}], Character,
                       max_tokens=200, temperature=0)
    assert isinstance(got, Character)

    async def main() -> Any:
        async with AsyncGrpcClient(server.address) as ac:
            return await ac.parse(model(server), [{"role": "user", "content": "Who?"}],
                                  PERSON, max_tokens=120, temperature=0)

    value = anyio.run(main, backend="asyncio")
    jsonschema.validate(value, PERSON)


def test_run_tools_over_grpc(server: Served, client: GrpcClient) -> None:
    seen: list[tuple[int, int]] = []

    def add(a: Small, b: Small) -> int:
        """Add two numbers."""
        seen.append((a, b))
        return a + b

    run = client.run_tools(model(server), USER, [add], tool_choice="required", max_turns=2,
                           max_tokens=80, temperature=0)
    assert seen and run.turns >= 1
    assert run.messages[1]["tool_calls"][0]["function"]["name"] == "add"
    assert run.messages[2]["role"] == "tool" and run.messages[2]["content"] == str(sum(seen[0]))


def test_structural_tags_over_grpc(server: Served, client: GrpcClient) -> None:
    fmt = {"type": "structural_tag", "triggers": ["<tool"], "at_least_one": True,
           "structures": [{"begin": "<tool=add>", "schema": ADD["function"]["parameters"],
                           "end": "</tool>"}]}
    regions = 0
    for seed in range(3):
        done = client.complete(model(server), "ROMEO:", response_format=fmt, max_tokens=80,
                               temperature=1.0, seed=seed)
        assert done.text.startswith("<tool=add>")
        for body in re.findall(r"<tool=add>(.*?)</tool>", done.text, re.S):
            jsonschema.validate(json.loads(body), SCHEMAS["add"])
            regions += 1
    assert regions >= 2
    bad = {**fmt, "structures": [*fmt["structures"],  # type: ignore[list-item]
                                 {"begin": "<tool=x>", "schema": {"type": "wat"}, "end": ""}]}
    with pytest.raises(BadRequestError) as info:
        client.complete(model(server), "ROMEO:", response_format=bad)
    assert info.value.param == "response_format.structures[1].schema"
    with pytest.raises(BadRequestError) as info:
        client.complete(model(server), "ROMEO:", response_format={**fmt, "triggers": ["<x"]})
    assert info.value.param == "response_format.structures[0].begin"
