"""Hermes tool calls: parsing, streaming, and calls forced by the grammar."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.structured.tool_parsers import Llama3JsonToolParser, MistralToolParser
from servekit.structured.tools import (
    HermesToolParser,
    HermesToolStream,
    ToolCallDelta,
    collect_calls,
    guided_for_tool_choice,
)
from tests.structured.conftest import make_engine

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
TEXT = ('Let me check. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Verona", "days": 3}}'
        '</tool_call> done <tool_call>not json</tool_call> a < b')


def test_parse_calls_and_content() -> None:
    content, calls = HermesToolParser().parse(TEXT)
    assert [c.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Verona", "days": 3}
    assert content == "Let me check.  done <tool_call>not json</tool_call> a < b"
    assert len({c.id for c in calls}) == 2


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, len(TEXT)), max_size=30))
def test_streamed_deltas_concatenate_to_the_parsed_result(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TEXT)]
    stream = HermesToolStream()
    content, calls = "", []
    for a, b in itertools.pairwise(bounds):
        c, k = stream.feed(TEXT[a:b])
        content += c
        calls += k
    rest, more = stream.flush()
    whole_content, whole_calls = HermesToolParser().parse(TEXT)
    assert content + rest == whole_content
    assert [(c.name, c.arguments) for c in collect_calls(calls + more)] == [
        (c.name, c.arguments) for c in whole_calls]


def feed_chars(text: str) -> tuple[str, list[ToolCallDelta]]:
    """``text`` through a HermesToolStream one character at a time."""
    stream = HermesToolStream()
    content, deltas = "", []
    for ch in text:
        c, d = stream.feed(ch)
        content, deltas = content + c, deltas + d
    rest, more = stream.flush()
    return content + rest, deltas + more


def test_arguments_stream_as_the_model_writes_them() -> None:
    """Head first (id and name, no arguments), then the arguments object's own text in
    pieces: the exact text the model wrote, braces inside strings included."""
    args = '{"city": "Ve{r}ona \\" }", "days": [3, {"x": 1}]}'
    text = f'Hi <tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call> ok'
    content, deltas = feed_chars(text)
    assert content == "Hi  ok"
    head, *rest = deltas
    assert (head.index, head.name, head.arguments) == (0, "get_weather", "")
    assert head.id is not None and head.id.startswith("call_")
    assert all(d.id is None and d.index == 0 for d in rest) and len(rest) == len(args)
    assert "".join(d.arguments for d in rest) == args
    [call] = HermesToolParser().parse(text)[1]
    assert (call.name, call.arguments) == ("get_weather", args)


def test_other_call_shapes_go_out_whole_at_the_closing_tag() -> None:
    text = ('<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>')
    content, deltas = feed_chars(text)
    assert content == ""
    assert [(d.index, d.name, json.loads(d.arguments)) for d in deltas] == [
        (0, "add", {"a": 1}), (1, "add", {"a": 2})]


def test_a_call_cut_after_its_head_keeps_its_partial_arguments() -> None:
    """Streamed pieces cannot be taken back: the output's end (max_tokens) leaves the call with
    the arguments written so far, streamed and parsed alike; cut before the head it is text."""
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b'
    content, deltas = feed_chars(cut)
    assert content == "" and collect_calls(deltas)[0].arguments == '{"a": 1, "b'
    assert HermesToolParser().parse(cut)[1][0].arguments == '{"a": 1, "b'
    early = '<tool_call>\n{"name": "ad'
    assert feed_chars(early) == (early, [])
    assert HermesToolParser().parse(early) == (early, [])


def test_tool_choice_errors_name_the_field() -> None:
    with pytest.raises(InvalidParameterError) as info:
        guided_for_tool_choice(TOOLS, {"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice.function.name"
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]
    with pytest.raises(InvalidParameterError) as info:
        guided_for_tool_choice(bad, "required")
    assert info.value.param == "tools[0].function.parameters"
    assert guided_for_tool_choice(TOOLS, "auto") is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_from_the_demo_model_validate(demo_dir: Path, choice: Any) -> None:
    engine = make_engine(demo_dir, num_blocks=128)
    guided = guided_for_tool_choice(TOOLS, choice)
    params = [SamplingParams(max_tokens=200, temperature=t, seed=i, guided=guided)
              for i, t in enumerate([0.0, 1.0, 1.0, 0.7])]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for r in engine.generate(["ROMEO:"] * 4, params):
        assert r.finish_reason == "stop", r.text
        content, calls = HermesToolParser().parse(r.text)
        assert content == "" and len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0].name == "add"
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])


ADD_1 = {"name": "add", "arguments": {"a": 1, "b": 2}}
WEATHER_1 = {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}
BAD_ADD = {"name": "add", "arguments": {"a": "one", "b": 2}}


def _hermes(calls: list[dict[str, Any]]) -> str:
    return "".join(f"<tool_call>\n{json.dumps(c, separators=(',', ':'))}\n</tool_call>"
                   for c in calls)


def _mistral(calls: list[dict[str, Any]]) -> str:
    return "[TOOL_CALLS]" + json.dumps(calls, separators=(",", ":"))


def _llama(calls: list[dict[str, Any]]) -> str:
    return ";".join(json.dumps({"name": c["name"], "parameters": c["arguments"]},
                               separators=(",", ":")) for c in calls)


FORMATS = [(HermesToolParser(), _hermes), (MistralToolParser(), _mistral),
           (Llama3JsonToolParser(), _llama)]


def accepts(guided: Any, text: str) -> bool:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    return bool(_is_grammar_accept_string(xgr.Grammar.from_ebnf(guided.value), text))


@pytest.mark.parametrize(("parser", "render"), FORMATS)
def test_required_with_parallel_calls_allows_one_or_more(parser: Any, render: Any) -> None:
    """``required`` with ``parallel``: one call, then optionally more, each valid against its
    own tool; without ``parallel`` (and for a named function) exactly one."""
    several = parser.guided(TOOLS, "required", parallel=True)
    one = parser.guided(TOOLS, "required", parallel=False)
    named = parser.guided(TOOLS, {"type": "function", "function": {"name": "add"}},
                          parallel=True)
    for calls in ([ADD_1], [WEATHER_1, ADD_1], [ADD_1, ADD_1, WEATHER_1]):
        text = render(calls)
        assert accepts(several, text), text
        assert accepts(one, text) == (len(calls) == 1)
        assert accepts(named, text) == (calls == [ADD_1])
        parsed = parser.parse(text)[1]
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
            (c["name"], c["arguments"]) for c in calls]
    assert not accepts(several, render([ADD_1, BAD_ADD]))  # every call obeys its schema
    assert not accepts(several, render([]))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab{}[]"\\ <>/\n\t日'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet='xy{}"\\', max_size=3), inner, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(args=st.dictionaries(st.text(alphabet='ab"{}\\', max_size=4), _json_values, max_size=4),
       indent=st.sampled_from([None, 1]), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_streamed_arguments_are_the_written_object_whatever_the_cuts(
        args: dict[str, Any], indent: int | None, cuts: list[int]) -> None:
    written = json.dumps(args, indent=indent, ensure_ascii=False)
    text = f'<tool_call>\n{{"name": "f", "arguments": {written}}}\n</tool_call>'
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    stream = HermesToolStream()
    deltas: list[ToolCallDelta] = []
    for a, b in itertools.pairwise(bounds):
        content, new = stream.feed(text[a:b])
        assert content == ""
        deltas += new
    assert stream.flush() == ("", [])
    [call] = collect_calls(deltas)
    assert (call.name, call.arguments) == ("f", written)
    assert json.loads(call.arguments) == args
