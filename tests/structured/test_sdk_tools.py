"""``run_tools``, the SDK's agent loop, against the real server with the demo model."""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
import httpx
import jsonschema

from servekit.client import AsyncClient, Client, function_tool
from servekit.client.tools import ToolRun
from servekit.client.types import Usage
from tests.server.conftest import Running

MODEL = "servekit-demo"
USER = [{"role": "user", "content": "What is two plus three?"}]
Small = Annotated[int, {"minimum": 0, "maximum": 99}]


def check_run(run: ToolRun, seen: list[dict[str, Any]], schema: dict[str, Any]) -> None:
    """A forced first turn ran the function once with valid arguments; then a final answer."""
    assert run.completed and run.turns == 2 and run.content is not None
    [args] = seen
    jsonschema.validate(args, schema)
    first = run.completions[0].choices[0]
    assert first.finish_reason == "tool_calls" and len(first.message.tool_calls) == 1
    assert not run.completions[1].choices[0].message.tool_calls
    roles = [m["role"] for m in run.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = run.messages[1]["tool_calls"][0]
    assert run.messages[2]["tool_call_id"] == call["id"]
    assert run.messages[2]["content"] == str(args["a"] + args["b"])
    assert run.messages[3]["content"] == (run.content or None)
    total = Usage(0, 0, 0)
    for c in run.completions:
        assert c.usage is not None
        total = total + c.usage
    assert run.usage == total and run.usage.total_tokens == (
        run.usage.prompt_tokens + run.usage.completion_tokens) > 0


def test_run_tools_sync(server: Running) -> None:
    seen: list[dict[str, Any]] = []

    def add(a: Small, b: Small) -> int:
        """Add two numbers."""
        seen.append({"a": a, "b": b})
        return a + b

    with Client(server.url) as client:
        run = client.run_tools(MODEL, USER, [add], tool_choice="required", max_turns=4,
                               max_tokens=80, temperature=0)
    check_run(run, seen, function_tool(add).parameters)


def test_run_tools_async_with_an_async_function(server: Running) -> None:
    seen: list[dict[str, Any]] = []

    async def add(a: Small, b: Small) -> int:
        await anyio.sleep(0)
        seen.append({"a": a, "b": b})
        return a + b

    async def main() -> ToolRun:
        async with AsyncClient(server.url) as client:
            return await client.run_tools(MODEL, USER, [add], tool_choice="add", max_turns=4,
                                          max_tokens=80, temperature=1.0, seed=3)

    check_run(anyio.run(main), seen, function_tool(add).parameters)


def test_max_turns_stops_with_a_flag(server: Running) -> None:
    seen: list[int] = []

    def add(a: Small, b: Small) -> int:
        seen.append(a + b)
        return a + b

    with Client(server.url) as client:
        run = client.run_tools(MODEL, USER, [add], tool_choice="required", max_turns=1,
                               max_tokens=80, temperature=0)
    assert not run.completed and run.content is None and run.turns == 1
    assert len(seen) == 1 and run.messages[-1]["role"] == "tool"


class RenameTools(httpx.BaseTransport):
    """Passes requests to the real server; in answers, calls to ``add`` become ``ghost`` (a
    model asking for a tool the loop does not have)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = json.loads(response.read())
        for choice in body.get("choices", ()):
            for call in choice["message"].get("tool_calls") or ():
                call["function"]["name"] = "ghost"
        return httpx.Response(response.status_code, json=body)


def test_an_unknown_tool_is_an_error_result_not_a_crash(server: Running) -> None:
    seen: list[int] = []

    def add(a: Small, b: Small) -> int:
        seen.append(a + b)
        return a + b

    with Client(server.url, transport=RenameTools()) as client:
        run = client.run_tools(MODEL, USER, [add], tool_choice="required", max_turns=3,
                               max_tokens=64, temperature=0)
    assert seen == [] and run.completed and run.turns == 2
    result = run.messages[2]
    assert result["role"] == "tool" and "unknown tool 'ghost'" in json.loads(
        result["content"])["error"]
