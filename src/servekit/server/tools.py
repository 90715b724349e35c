"""Structured outputs and tools at the server's boundary: validate, plan, compile before queueing.

:func:`plan_tools` turns a chat request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
into a :class:`ToolPlan` (the tools to render into the prompt, the parser, the grammar forcing a
call); :func:`chat_messages` turns the request's messages, tool calls and tool results included,
into what the chat template renders; :func:`compile_guided` compiles a constraint in a worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
from attrs import frozen

from servekit.protocol.errors import InvalidRequestError
from servekit.protocol.schema import ChatCompletionRequest
from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.tool_parsers import tool_parser_for
from servekit.structured.tools import ToolParser, tool_names

__all__ = ["ToolPlan", "chat_messages", "compile_guided", "plan_tools"]


@frozen(slots=True)
class ToolPlan:
    """What a chat request's tool fields mean for this request.

    ``prompt_tools``: the tools the chat template renders (None: none); ``parser``: parses tool
    calls out of the output (None: plain text, e.g. ``tool_choice: "none"``); ``guided``: the
    grammar forcing a call (``required`` or a named function); ``parallel``: more than one call
    per message allowed.
    """

    prompt_tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    guided: GuidedDecoding | None = None
    parallel: bool = True


NO_TOOLS = ToolPlan()


async def plan_tools(req: ChatCompletionRequest, chat_template: str | None) -> ToolPlan:
    """The request's :class:`ToolPlan`; a bad field is a 400 naming it (``tools[1].function.
    parameters``, ``tool_choice``, ...). The grammar is built in a worker thread."""
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise InvalidRequestError(
            f"Invalid value for 'tool_choice': must be 'auto', 'none', 'required' or "
            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}",
            param="tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") != "function":
        raise InvalidRequestError("Invalid value for 'tool_choice.type': must be 'function'",
                                  param="tool_choice.type")
    if not req.tools:
        if choice is not None and choice not in ("auto", "none"):
            raise InvalidRequestError("'tool_choice' needs 'tools': there is no tool to call",
                                      param="tool_choice")
        return NO_TOOLS
    tools = [dict(t) if isinstance(t, Mapping) else t for t in req.tools]
    parser = tool_parser_for(chat_template)
    try:
        tool_names(tools)  # the shape of every tool, whatever the choice
        guided = None
        if choice not in (None, "auto", "none"):
            guided = await anyio.to_thread.run_sync(parser.guided, tools, choice)
    except InvalidParameterError as exc:
        raise InvalidRequestError(f"Invalid value for '{exc.param}': "
                                  f"{str(exc).split(': ', 1)[-1]}", param=exc.param) from exc
    if guided is not None and _response_format_constrains(req.response_format):
        raise InvalidRequestError(
            "response_format cannot be combined with tool_choice 'required' or a named "
            "function: both constrain the output", param="response_format")
    if choice == "none":  # no call wanted: the model does not see the tools either
        return ToolPlan(parallel=req.parallel_tool_calls is not False)
    return ToolPlan(prompt_tools=tools, parser=parser, guided=guided,
                    parallel=req.parallel_tool_calls is not False)


def _response_format_constrains(response_format: Mapping[str, Any] | None) -> bool:
    return isinstance(response_format, Mapping) and response_format.get("type") != "text"


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them: an assistant's ``tool_calls``
    carry their arguments as objects (HF convention), a tool result its ``tool_call_id``."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequestError(
                    f"Invalid value for 'messages.[{i}].tool_calls': only assistant messages "
                    "carry tool calls", param=f"messages.[{i}].tool_calls")
            msg["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name,
                    "arguments": _arguments(call.function.arguments,
                                            f"messages.[{i}].tool_calls.[{j}].function.arguments")}}
                for j, call in enumerate(m.tool_calls)]
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequestError(
                    f"Missing required parameter: 'messages.[{i}].tool_call_id'",
                    param=f"messages.[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"Invalid value for '{param}': must be a JSON object as text",
                                  param=param)
    return value


async def compile_guided(engine: Any, guided: GuidedDecoding | None,
                         param: str | None = None) -> None:
    """Compile ``guided`` with the engine's grammar compiler in a worker thread (cached by spec),
    so an unusable schema is a 400 naming the field and the engine finds the grammar ready.

    ``param``: the field named in the error (default: ``response_format``'s). Engines without
    a grammar compiler (a plugged fake) skip the check; their requests fail.
    """
    if guided is None:
        return
    inner = getattr(engine, "engine", engine)  # AsyncEngine wraps the LLMEngine
    if not hasattr(inner, "grammars"):
        return
    if param is None:
        param = ("response_format.json_schema.schema" if guided.kind == "json_schema"
                 else "response_format")
    try:
        await anyio.to_thread.run_sync(lambda: inner.grammars.compile(guided))
    except InvalidParameterError as exc:
        raise InvalidRequestError(f"Invalid value for '{param}': {exc}", param=param) from exc
