"""Tool schemas from Python functions, and the agent loop's dispatch of calls (no server)."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

import anyio
import jsonschema
import pytest
from pydantic import BaseModel

from servekit.client import function_tool
from servekit.client.tools import FunctionTool, ToolLoop
from servekit.client.types import ToolCall


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(BaseModel):
    x: int
    y: int


def everything(text: str, n: Annotated[int, {"minimum": 0, "maximum": 9}], ratio: float,
               flag: bool, tags: list[str], pair: tuple[int, str], meta: dict[str, Any],
               mode: Literal["a", "b"], color: Color, point: Point, maybe: int | None = None,
               anything=None) -> None:  # type: ignore[no-untyped-def]
    """Do everything.

    More words that are not the description."""


def test_schema_from_hints_and_docstring() -> None:
    tool = function_tool(everything)
    assert tool.name == "everything" and tool.description == "Do everything."
    props = tool.parameters["properties"]
    assert props["text"] == {"type": "string"}
    assert props["n"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert props["ratio"] == {"type": "number"} and props["flag"] == {"type": "boolean"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["meta"] == {"type": "object"}
    assert props["mode"] == {"enum": ["a", "b"]} and props["color"] == {"enum": ["red", "blue"]}
    assert props["point"]["properties"]["x"]["type"] == "integer"
    assert props["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert props["anything"] == {}
    assert tool.parameters["required"] == [
        "text", "n", "ratio", "flag", "tags", "pair", "meta", "mode", "color", "point"]
    jsonschema.Draft202012Validator.check_schema(tool.parameters)
    assert tool.to_json()["function"]["parameters"] is tool.parameters


def test_decorator_forms_and_rejections() -> None:
    @function_tool(name="sum2", description="Adds.")
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert isinstance(add, FunctionTool) and add.name == "sum2" and add.description == "Adds."
    assert add.parameters["required"] == ["a"] and function_tool(add) is add

    def star(*args: int) -> None: ...

    def odd(x: complex) -> None: ...

    for fn in (star, odd):
        with pytest.raises(TypeError):
            function_tool(fn)


def loop_with(*tools: Any) -> ToolLoop:
    return ToolLoop.create([{"role": "user", "content": "go"}], tools, max_turns=2)


def last_result(loop: ToolLoop) -> Any:
    message = loop.messages[-1]
    assert message["role"] == "tool"
    return message["content"]


def test_calls_run_or_become_error_results() -> None:
    seen: list[Any] = []

    def paint(color: Color, point: Point) -> dict[str, Any]:
        seen.append((color, point))
        return {"ok": True}

    def boom() -> None:
        raise RuntimeError("no")

    loop = loop_with(paint, boom)
    loop.run_sync(ToolCall("c1", "paint", '{"color": "red", "point": {"x": 1, "y": 2}}'))
    assert seen == [(Color.RED, Point(x=1, y=2))] and last_result(loop) == '{"ok": true}'
    for call, error in [
        (ToolCall("c2", "ghost", "{}"), "unknown tool 'ghost'"),
        (ToolCall("c3", "paint", "{nope"), "the arguments are not JSON"),
        (ToolCall("c4", "paint", "[1]"), "the arguments must be a JSON object"),
        (ToolCall("c5", "paint", '{"color": "green", "point": {"x": 1, "y": 2}}'),
         "invalid arguments"),
        (ToolCall("c6", "boom", "{}"), "RuntimeError: no"),
        (ToolCall("c7", "paint", "{}"), "TypeError"),
    ]:
        loop.run_sync(call)
        assert loop.messages[-1]["tool_call_id"] == call.id
        assert error in json.loads(last_result(loop))["error"]
    assert len(seen) == 1


def test_async_functions_run_in_both_loops() -> None:
    async def slow(x: int) -> int:
        await anyio.sleep(0)
        return x * 2

    def fast(x: int) -> str:
        return f"got {x}"

    loop = loop_with(slow, fast)
    loop.run_sync(ToolCall("a", "slow", '{"x": 4}'))
    assert last_result(loop) == "8"

    async def main() -> None:
        await loop.run_async(ToolCall("b", "slow", '{"x": 5}'))
        assert last_result(loop) == "10"
        await loop.run_async(ToolCall("c", "fast", '{"x": 1}'))
        assert last_result(loop) == "got 1"
        await loop.run_async(ToolCall("d", "ghost", "{}"))
        assert "unknown tool" in last_result(loop)

    anyio.run(main)


def test_first_turn_choice_only_and_tool_names() -> None:
    def add(a: int) -> int:
        return a

    loop = ToolLoop.create([], [add], max_turns=3, tool_choice="add")
    assert loop.request()["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    with pytest.raises(ValueError):
        ToolLoop.create([], [add, function_tool(add)], max_turns=3)
    with pytest.raises(ValueError):
        ToolLoop.create([], [add], max_turns=0)
