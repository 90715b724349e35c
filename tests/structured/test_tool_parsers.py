"""Llama 3 JSON and Mistral tool-call formats, and the choice of a format from a template."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.sched.params import SamplingParams
from servekit.structured.tool_parsers import (
    Llama3JsonToolParser,
    MistralToolParser,
    tool_parser_for,
)
from servekit.structured.tools import HermesToolParser, ToolParser, collect_calls
from tests.structured.conftest import make_engine
from tests.structured.test_tools import TOOLS, _json_values

LLAMA = [
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome", "days": 2})]),
    ('  {"name":"add","parameters":"{\\"a\\": 3, \\"b\\": 4}"}', "", [("add", {"a": 3, "b": 4})]),
    ("Romeo speaks {not a call}", "Romeo speaks {not a call}", []),
    # cut after its head: the call keeps the arguments written so far (they streamed)
    ('{"name": "add", "parameters": {"a": 1', "", [("add", '{"a": 1')]),
    ('{"name": "ad', '{"name": "ad', []),  # cut before: content
    ('{"parameters": {"a": 1}, "name": "add"}', "", [("add", {"a": 1})]),  # parsed whole
    ("<|python_ta", "<|python_ta", []),
    ("<b>bold</b>", "<b>bold</b>", []),
]
MISTRAL = [
    ('Let me see.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}]',
     "Let me see.", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome", "days": 2})]),
    ("Just words [TOOL_CA", "Just words [TOOL_CA", []),
    ('x[TOOL_CALLS][{"name": "add"', 'x[TOOL_CALLS][{"name": "add"', []),
    ('x[TOOL_CALLS][{"name": "add", "arguments": {"a": 1', "x", [("add", '{"a": 1')]),
    ('[TOOL_CALLS][{"name": "add", "arguments": {}}, {"arguments": {"a": 2}, "name": "add"}]',
     "", [("add", {}), ("add", {"a": 2})]),  # the second call does not stream: parsed whole
    ('[TOOL_CALLS][{"name": "add", "arguments": {}}] and then', " and then", [("add", {})]),
    ("[TOOL_CALLS]{}", "[TOOL_CALLS]{}", []),
]
CASES = [(Llama3JsonToolParser(), *case) for case in LLAMA] + [
    (MistralToolParser(), *case) for case in MISTRAL]


def named(calls: list[Any]) -> list[tuple[str, Any]]:
    """Each call's name and arguments (as a value; as text when cut, so not JSON)."""
    def value(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return text
    return [(c.name, value(c.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_parse(parser: ToolParser, text: str, content: str, calls: list[Any]) -> None:
    got_content, got_calls = parser.parse(text)
    assert (got_content, named(got_calls)) == (content, calls)
    if isinstance(parser, MistralToolParser):
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streams_release_what_parse_finds(case: tuple[Any, ...], cuts: list[int]) -> None:
    parser, text, content, calls = case
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    stream = parser.stream()
    got_content, got_calls = "", []
    for a, b in itertools.pairwise(bounds):
        c, k = stream.feed(text[a:b])
        got_content += c
        got_calls += k
    rest, more = stream.flush()
    assert (got_content + rest, named(collect_calls(got_calls + more))) == (content, calls)


def test_the_parser_follows_the_chat_template(demo_dir: Path) -> None:
    assert isinstance(tool_parser_for(None), HermesToolParser)
    assert isinstance(tool_parser_for((demo_dir / "chat_template.jinja").read_text()),
                      HermesToolParser)
    assert isinstance(tool_parser_for("{{ '[TOOL_CALLS]' + tool_calls | tojson }}"),
                      MistralToolParser)
    assert isinstance(tool_parser_for("{{- '<|python_tag|>' + tool_call.name }}"),
                      Llama3JsonToolParser)
    assert isinstance(tool_parser_for("<|python_tag|> ... <tool_call>"), HermesToolParser)


@pytest.mark.parametrize("parser", [Llama3JsonToolParser(), MistralToolParser()])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_in_each_format_parse_and_validate(demo_dir: Path, parser: ToolParser,
                                                        choice: Any) -> None:
    engine = make_engine(demo_dir, num_blocks=128)
    guided = parser.guided(TOOLS, choice)
    params = [SamplingParams(max_tokens=200, temperature=t, seed=i, guided=guided)
              for i, t in enumerate([0.0, 1.0, 0.7])]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for r in engine.generate(["ROMEO:"] * 3, params):
        assert r.finish_reason == "stop", r.text
        content, calls = parser.parse(r.text)
        assert content == "" and len(calls) == 1, r.text
        if isinstance(choice, dict):
            assert calls[0].name == "add"
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])


@settings(max_examples=100, deadline=None)
@given(args=st.lists(st.dictionaries(st.text(alphabet='ab"{}[]\\', max_size=4), _json_values,
                                     max_size=3), min_size=1, max_size=3),
       indent=st.sampled_from([None, 1]), mistral=st.booleans(),
       cuts=st.lists(st.integers(0, 600), max_size=20))
def test_mistral_and_llama_arguments_stream_as_written(
        args: list[dict[str, Any]], indent: int | None, mistral: bool, cuts: list[int]) -> None:
    """Each call's id and name go out as soon as its head is in, then its arguments object's
    own text in pieces; joined, the pieces are exactly what the model wrote."""
    written = [json.dumps(a, indent=indent, ensure_ascii=False) for a in args]
    if mistral:
        parser: ToolParser = MistralToolParser()
        text = "Sure.[TOOL_CALLS][" + ", ".join(
            f'{{"name": "f{k}", "arguments": {w}}}' for k, w in enumerate(written)) + "]"
    else:
        parser = Llama3JsonToolParser()
        text = "<|python_tag|>" + "; ".join(
            f'{{"name": "f{k}", "parameters": {w}}}' for k, w in enumerate(written))
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    stream = parser.stream()
    content, deltas = "", []
    for a, b in itertools.pairwise(bounds):
        c, d = stream.feed(text[a:b])
        content, deltas = content + c, deltas + d
    rest, more = stream.flush()
    assert (content + rest, more) == ("Sure." if mistral else "", [])
    calls = collect_calls(deltas)
    assert [(c.name, c.arguments) for c in calls] == [
        (f"f{k}", w) for k, w in enumerate(written)]
    heads = [d for d in deltas if d.id is not None]
    assert [d.arguments for d in heads] == [""] * len(args)  # the head before its arguments


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}]',
    '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": [2, "}"]}}'])
def test_fed_a_character_at_a_time_each_argument_character_is_a_piece(text: str) -> None:
    parser = tool_parser_for(text)
    stream = parser.stream()
    deltas = [d for ch in text for d in stream.feed(ch)[1]] + stream.flush()[1]
    head, *pieces = deltas
    assert head.name == "add" and head.id and head.arguments == ""
    assert [p.arguments for p in pieces] == list('{"a": 1, "b": [2, "}"]}')
