"""``tools`` / ``tool_choice`` on the real server with the demo model (and its Hermes template)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import anyio
import httpx
import jsonschema
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.engine.outputs import RequestOutput
from servekit.sched.params import SamplingParams
from servekit.server import FakeEngine, create_app
from servekit.server.app import ServerConfig
from servekit.server.fake import FakeTokenizer
from servekit.server.responses import ToolChatEncoder
from servekit.server.service import Job
from servekit.server.tools import plan_tool_fields
from servekit.structured.tools import HermesToolParser
from tests.server.conftest import Running, free_port
from tests.structured.strategies import tool_parameters

MODEL = "servekit-demo"
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Add two and three."}]
NAMED = {"type": "function", "function": {"name": "add"}}


def chat(server: Running, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": USER, **body})


def stream(server: Running, **body: Any) -> tuple[list[dict[str, Any]], str, str]:
    """The streamed tool calls (arguments joined per index, ``fragments``: how many non-empty
    argument pieces came), the content, the finish reason."""
    calls: dict[int, dict[str, Any]] = {}
    content, finish = "", ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": USER, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                for part in delta.get("tool_calls") or ():
                    call = calls.setdefault(part["index"], {"arguments": "", "fragments": 0})
                    for key in ("id", "type"):
                        if key in part:
                            call[key] = part[key]
                    fn = part.get("function", {})
                    if "name" in fn:
                        call["name"] = fn["name"]
                    call["arguments"] += fn.get("arguments", "")
                    call["fragments"] += bool(fn.get("arguments"))
                finish = choice["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], content, finish


def check_call(call: dict[str, Any], name: str | None = None) -> None:
    assert call["id"].startswith("call_") and call["type"] == "function"
    fn = call.get("function", call)
    assert fn["name"] in SCHEMAS and (name is None or fn["name"] == name)
    jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


@pytest.mark.parametrize(("choice", "parallel"), [
    ("required", None), ("required", False), (NAMED, None)])
def test_forced_calls_validate_whole_and_streamed(server: Running, choice: Any,
                                                  parallel: bool | None) -> None:
    """Every forced call validates; ``required`` allows several calls unless
    ``parallel_tool_calls`` is false, a named function exactly one."""
    name = "add" if isinstance(choice, dict) else None
    for i, temperature in enumerate((0.0, 1.0, 1.0)):
        body = {"tools": TOOLS, "tool_choice": choice, "temperature": temperature, "seed": i,
                **({} if parallel is None else {"parallel_tool_calls": parallel})}
        r = chat(server, **body)
        assert r.status_code == 200, r.text
        out = r.json()["choices"][0]
        assert out["finish_reason"] == "tool_calls", out
        assert out["message"]["content"] is None
        whole = out["message"]["tool_calls"]
        assert len(whole) >= 1 and ((choice == "required" and parallel is None) or len(whole) == 1)
        for call in whole:
            check_call(call, name)
        calls, content, finish = stream(server, **body)
        assert finish == "tool_calls" and content == ""
        assert len(calls) == len(whole)
        for streamed, call in zip(calls, whole, strict=True):
            check_call(streamed, name)
            # same seed, same sampling: the stream's joined fragments equal the whole response's
            assert (streamed["name"], streamed["arguments"]) == (
                call["function"]["name"], call["function"]["arguments"])
            # the arguments stream as the model writes them, not as one piece at the end
            assert streamed["fragments"] > 1


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_reaches_the_grammar(parallel: bool | None) -> None:
    """``required`` with ``parallel_tool_calls`` (default true) lets the grammar go on after a
    call with another one; false stops it after the first."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    plan = anyio.run(plan_tool_fields, TOOLS, "required", parallel, None, None)
    assert plan.guided is not None
    grammar = xgr.Grammar.from_ebnf(plan.guided.value)
    one = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    two = one + '<tool_call>\n{"name":"weather","arguments":{"city":"Rome","days":2}}\n</tool_call>'
    assert _is_grammar_accept_string(grammar, one)
    assert _is_grammar_accept_string(grammar, two) == (parallel is not False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=tool_parameters)
def test_random_parameter_schemas_yield_valid_calls(server: Running,
                                                    params: dict[str, Any]) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    r = chat(server, tools=[tool], tool_choice="required", temperature=1.0, seed=7)
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]
    assert out["finish_reason"] == "tool_calls", out
    [call] = out["message"]["tool_calls"]
    assert call["function"]["name"] == "f"
    jsonschema.validate(json.loads(call["function"]["arguments"]), params)


def test_the_openai_client_reads_tool_calls(server: Running) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    done = client.chat.completions.create(model=MODEL, messages=USER,  # type: ignore[arg-type]
                                          tools=TOOLS, tool_choice="required", temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    chunks = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,  # type: ignore[arg-type]
        temperature=0, stream=True)
    pieces = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or ()]
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "add"
    assert all(tc.id is None and tc.index == 0 for tc in pieces[1:]) and len(pieces) > 2
    args = "".join(tc.function.arguments or "" for tc in pieces if tc.function)
    jsonschema.validate(json.loads(args), SCHEMAS["add"])
    # the client's own stream accumulation joins the pieces into the same call
    with client.chat.completions.stream(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,  # type: ignore[arg-type]
            temperature=0) as events:
        final = events.get_final_completion()
    [joined] = final.choices[0].message.tool_calls or []
    assert joined.function.name == "add" and joined.function.arguments == args


def test_tool_results_round_trip_through_the_template(server: Running) -> None:
    first = chat(server, tools=TOOLS, tool_choice=NAMED, temperature=0).json()
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    args = json.loads(call["function"]["arguments"])
    history = [*USER, message, {"role": "tool", "tool_call_id": call["id"],
                                "content": str(args["a"] + args["b"])}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": history, "tools": TOOLS, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    tok = server.service.engine.tokenizer
    text = tok.apply_chat_template(
        [*USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "add", "arguments": args}}]},
         {"role": "tool", "content": str(args["a"] + args["b"])}],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    call_text = json.dumps({"name": "add", "arguments": args}, separators=(",", ":"))
    assert f"<tool_call>\n{call_text}\n</tool_call>" in text
    assert f"TOOL:\n<tool_response>\n{args['a'] + args['b']}\n</tool_response>" in text
    assert "<tools>\nweather(city, days)\nadd(a, b)\n</tools>" in text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))


def test_plain_messages_render_as_before(server: Running) -> None:
    tok = server.service.engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, *USER,
                {"role": "assistant", "content": "Five.", "name": "romeo"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|bos|>SYSTEM:\nBe brief.\n<|eos|><|bos|>USER:\nAdd two and three.\n<|eos|>"
        "<|bos|>ROMEO:\nFive.\n<|eos|><|bos|>ASSISTANT:\n")


def test_none_and_auto(server: Running) -> None:
    plain = chat(server, max_tokens=6, temperature=0).json()
    none = chat(server, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0).json()
    # "none": no tools in the prompt, no parsing: exactly the plain answer
    keys = ("prompt_tokens", "completion_tokens")
    assert [none["usage"][k] for k in keys] == [plain["usage"][k] for k in keys]
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    auto = chat(server, tools=TOOLS, max_tokens=6, temperature=0).json()
    assert auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # tools rendered
    assert auto["choices"][0]["finish_reason"] in ("stop", "length")
    assert "tool_calls" not in auto["choices"][0]["message"]


def test_a_forced_call_cut_by_max_tokens_is_length_with_the_partial_text(server: Running) -> None:
    """Cut before the call's head is complete: the partial text is content. Cut later: the call
    with the arguments written so far (streamed pieces cannot be taken back), whole or not."""
    full = chat(server, tools=TOOLS, tool_choice=NAMED, temperature=0).json()
    total = full["usage"]["completion_tokens"]
    arguments = full["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    out = chat(server, tools=TOOLS, tool_choice=NAMED, max_tokens=16, temperature=0).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith("<tool_call>\n{\"")
    calls, content, finish = stream(server, tools=TOOLS, tool_choice=NAMED, max_tokens=16,
                                    temperature=0)
    assert (calls, finish) == ([], "length") and content == choice["message"]["content"]
    for limit in range(total - 1, 16, -1):  # the longest cut inside the arguments
        late = chat(server, tools=TOOLS, tool_choice=NAMED, max_tokens=limit,
                    temperature=0).json()["choices"][0]
        [cut] = late["message"]["tool_calls"]
        if cut["function"]["arguments"] != arguments:
            break
    assert late["finish_reason"] == "length" and not late["message"]["content"]
    assert cut["function"]["arguments"] != arguments
    assert arguments.startswith(cut["function"]["arguments"]) and cut["function"]["arguments"]
    calls, content, finish = stream(server, tools=TOOLS, tool_choice=NAMED,
                                    max_tokens=limit, temperature=0)
    assert finish == "length" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("add", cut["function"]["arguments"])]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
      "tool_choice": "required"}, "tools[1].function.parameters"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "3"}]}, "messages.[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.[0].tool_calls"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.[1].tool_calls.[0].function.arguments"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]},
     "messages.[1].tool_calls.[0].function.arguments"),
])
def test_bad_tool_fields_are_a_400_naming_the_field(server: Running, body: dict[str, Any],
                                                     param: str) -> None:
    r = chat(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- the encoder alone: scripted outputs the demo model does not write ----------------------

TWO_CALLS = ('Sure. <tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>\n'
             '<tool_call>\n{"name":"weather","arguments":{"city":"Rome","days":2}}\n</tool_call>')


def run_encoder(text: str, *, parallel: bool = True, cuts: int = 7, finish: bool = True,
                resume: str = "") -> tuple[ToolChatEncoder, list[dict[str, Any]]]:
    """Run ``text`` through a ToolChatEncoder as deltas of ``cuts`` characters (``resume``: the
    text a first replica already streamed, handed over as its byte tokens)."""
    params = SamplingParams(max_tokens=4096)
    ids = FakeTokenizer().encode(resume, add_special_tokens=False) if resume else None
    job = Job("chatcmpl-x", MODEL, None, [[1, 2]], [(0, params)], resume=ids)
    job.finish_reasons = ["stop" if finish else None]
    enc = ToolChatEncoder(job, FakeTokenizer(), parser=HermesToolParser(), parallel=parallel)
    pieces = [text[k:k + cuts] for k in range(0, len(text), cuts)] or [""]
    events = []
    for n, piece in enumerate(pieces):
        last = finish and n == len(pieces) - 1
        out = RequestOutput("x", [], piece, last, "stop" if last else None, 2, n + 1, 0)
        enc.add(0, out)
        events += [json.loads(e[6:]) for e in enc.chunk(0, out).decode().split("\n\n") if e]
    return enc, events


def joined(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's content, calls (pieces joined per index) and finish reason."""
    calls: dict[int, dict[str, Any]] = {}
    for e in events:
        for tc in e["choices"][0]["delta"].get("tool_calls", ()):
            if "id" in tc:  # a call's first piece: index, id, type, name
                calls[tc["index"]] = {**tc, "function": dict(tc["function"])}
            else:
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return {"content": "".join(e["choices"][0]["delta"].get("content", "") for e in events),
            "calls": [calls[i] for i in sorted(calls)],
            "finish": events[-1]["choices"][0]["finish_reason"] if events else None}


def encode(text: str, *, parallel: bool, stream: bool, cuts: int = 7) -> dict[str, Any]:
    """``text`` through a ToolChatEncoder: the whole response's choice, or the stream joined."""
    enc, events = run_encoder(text, parallel=parallel, cuts=cuts)
    if not stream:
        return json.loads(enc.body())["choices"][0]  # type: ignore[no-any-return]
    return joined(events)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, len(TWO_CALLS)), cuts=st.integers(1, 40))
def test_a_resumed_stream_continues_a_cut_call(cut: int, cuts: int) -> None:
    """A gateway's failover: one replica streamed the output up to ``cut``, another gets those
    tokens as ``servekit_resume`` and streams the rest; joined, the two streams are the
    uncut one (a call cut mid-arguments goes on with its remaining fragments)."""
    _, first = run_encoder(TWO_CALLS[:cut], cuts=cuts, finish=False)
    _, second = run_encoder(TWO_CALLS[cut:], cuts=cuts, resume=TWO_CALLS[:cut])
    _, whole = run_encoder(TWO_CALLS, cuts=cuts)
    got, want = joined(first + second), joined(whole)
    assert got["content"] == want["content"] and got["finish"] == want["finish"]
    assert [(c["index"], c["function"]) for c in got["calls"]] == [
        (c["index"], c["function"]) for c in want["calls"]]


@settings(max_examples=60, deadline=None)
@given(parallel=st.booleans(), cuts=st.integers(1, 40))
def test_parallel_tool_calls_false_keeps_only_the_first_call(parallel: bool, cuts: int) -> None:
    whole = encode(TWO_CALLS, parallel=parallel, stream=False, cuts=cuts)
    names = [c["function"]["name"] for c in whole["message"]["tool_calls"]]
    assert names == (["add", "weather"] if parallel else ["add"])
    assert whole["message"]["content"].strip() == "Sure." and whole["finish_reason"] == "tool_calls"
    streamed = encode(TWO_CALLS, parallel=parallel, stream=True, cuts=cuts)
    assert [c["function"]["name"] for c in streamed["calls"]] == names
    assert [c["index"] for c in streamed["calls"]] == list(range(len(names)))
    assert [c["function"]["arguments"] for c in streamed["calls"]] == [
        c["function"]["arguments"] for c in whole["message"]["tool_calls"]]
    assert streamed["finish"] == "tool_calls" and streamed["content"].strip() == "Sure."


def test_a_tools_request_while_the_model_loads_is_a_503() -> None:
    loaded = threading.Event()

    def load() -> FakeEngine:
        loaded.wait(30)
        return FakeEngine(max_model_len=256)

    port = free_port()
    app = create_app(load, config=ServerConfig(model_names=("fake",)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", timeout=10, json={
            "model": "fake", "messages": USER, "tools": TOOLS, "tool_choice": "required"})
        assert r.status_code == 503, r.text
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(timeout=30)
