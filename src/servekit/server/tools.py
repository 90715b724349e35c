"""Structured outputs and tools at the server's boundary: validate, plan, compile before queueing.

:func:`plan_tools` turns a chat request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
into a :class:`ToolPlan` (the tools to render into the prompt, the parser, the grammar forcing a
call); :func:`chat_messages` turns the request's messages, tool calls and tool results included,
into what the chat template renders; :func:`compile_guided` compiles a constraint in a worker;
:class:`ToolOutputs` splits each choice's output into content and calls as it streams. The
HTTP and gRPC front ends share all of them (:func:`plan_tool_fields` and
:func:`template_messages` take plain values, whatever the transport).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from attrs import frozen

from servekit.protocol.errors import InvalidRequestError
from servekit.protocol.messages import template_messages
from servekit.protocol.schema import ChatCompletionRequest
from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.openai import response_format_param
from servekit.structured.tool_parsers import tool_parser_for
from servekit.structured.tools import ToolCall, ToolCallDelta, ToolParser, ToolStream, tool_names

__all__ = ["ToolOutputs", "ToolPlan", "chat_messages", "compile_guided", "plan_tool_fields",
           "plan_tools", "template_messages"]


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

    @property
    def keep_special_tokens(self) -> bool:
        """The parser reads special tokens (``[TOOL_CALLS]``): decode without skipping them."""
        return self.parser is not None and self.parser.needs_special_tokens


NO_TOOLS = ToolPlan()


async def plan_tools(req: ChatCompletionRequest, chat_template: str | None) -> ToolPlan:
    """The request's :class:`ToolPlan`; a bad field is a 400 naming it (``tools[1].function.
    parameters``, ``tool_choice``, ...). The grammar is built in a worker thread."""
    return await plan_tool_fields(req.tools, req.tool_choice, req.parallel_tool_calls,
                                  req.response_format, chat_template)


async def plan_tool_fields(tools: Sequence[Any] | None, choice: str | Mapping[str, Any] | None,
                           parallel_tool_calls: bool | None,
                           response_format: Mapping[str, Any] | None,
                           chat_template: str | None) -> ToolPlan:
    """:func:`plan_tools` on the fields themselves (OpenAI shapes: ``tools`` entries and a
    named ``tool_choice`` as dicts), for front ends without an OpenAI request body."""
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise InvalidRequestError(
            f"Invalid value for 'tool_choice': must be 'auto', 'none', 'required' or "
            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}",
            param="tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") != "function":
        raise InvalidRequestError("Invalid value for 'tool_choice.type': must be 'function'",
                                  param="tool_choice.type")
    if not tools:
        if choice is not None and choice not in ("auto", "none"):
            raise InvalidRequestError("'tool_choice' needs 'tools': there is no tool to call",
                                      param="tool_choice")
        return NO_TOOLS
    tool_list = [dict(t) if isinstance(t, Mapping) else t for t in tools]
    parser = tool_parser_for(chat_template)
    parallel = parallel_tool_calls is not False
    try:
        tool_names(tool_list)  # the shape of every tool, whatever the choice
        guided = None
        if choice not in (None, "auto", "none"):
            guided = await anyio.to_thread.run_sync(parser.guided, tool_list, choice, parallel)
    except InvalidParameterError as exc:
        raise InvalidRequestError(f"Invalid value for '{exc.param}': "
                                  f"{str(exc).split(': ', 1)[-1]}", param=exc.param) from exc
    if guided is not None and _response_format_constrains(response_format):
        raise InvalidRequestError(
            "response_format cannot be combined with tool_choice 'required' or a named "
            "function: both constrain the output", param="response_format")
    if choice == "none":  # no call wanted: the model does not see the tools either
        return ToolPlan(parallel=parallel)
    return ToolPlan(prompt_tools=tool_list, parser=parser, guided=guided, parallel=parallel)


def _response_format_constrains(response_format: Mapping[str, Any] | None) -> bool:
    return isinstance(response_format, Mapping) and response_format.get("type") != "text"


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them: an assistant's ``tool_calls``
    carry their arguments as objects (HF convention), a tool result its ``tool_call_id``."""
    return template_messages([
        {"role": m.role, "content": m.text(), "name": m.name, "tool_call_id": m.tool_call_id,
         "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                        for c in m.tool_calls or ()]}
        for m in req.messages])


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
        if guided.kind == "structural_tag":  # name the tag whose schema failed
            param = response_format_param(exc.param)
        raise InvalidRequestError(f"Invalid value for '{param}': {exc}", param=param) from exc


class ToolOutputs:
    """Each choice's output split into content and tool calls, streamed or whole, whatever the
    transport: content is released as soon as it cannot start a call; a call as
    :class:`ToolCallDelta` pieces (id and name first, then its arguments text as it grows),
    so streamed arguments concatenate to exactly the final ones. ``parallel=False`` keeps only
    the first call of a message. Trailing whitespace is held until other content follows, and
    dropped from a message of calls and whitespace (whose content is None, as
    :meth:`message_content`), so what streams depends on the text only, not on how it was cut
    (a resumed stream picks up exactly where the first one stopped)."""

    __slots__ = ("_held", "_sent", "_spoke", "_streams", "parallel", "parser")

    def __init__(self, parser: ToolParser, choices: int, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self._streams: list[ToolStream] = [parser.stream() for _ in range(choices)]
        self._sent = [0] * choices
        self._held = [""] * choices  # trailing whitespace, not sent yet
        self._spoke = [False] * choices  # content other than whitespace was sent

    def feed(self, i: int, text: str, finished: bool) -> tuple[str, list[ToolCallDelta]]:
        """Choice ``i``'s delta: the content to send now and the call pieces to send (those of
        one call merged; ``finished``: the output ended, flush what is held)."""
        stream = self._streams[i]
        content, deltas = stream.feed(text)
        if finished:
            rest, more = stream.flush()
            content, deltas = content + rest, deltas + more
        if not self.parallel:
            deltas = [d for d in deltas if d.index == 0]
        deltas = _merge(deltas)
        self._sent[i] += sum(d.id is not None for d in deltas)
        # trailing whitespace waits for more content: a message of calls has none
        body = content.rstrip()
        if body:
            content, self._held[i] = self._held[i] + body, content[len(body):]
            self._spoke[i] = True
        else:
            content, self._held[i] = "", self._held[i] + content
        if finished:
            if self._spoke[i] or not self._sent[i]:
                content += self._held[i]
            self._held[i] = ""
        return content, deltas

    def sent(self, i: int) -> int:
        """Calls streamed so far for choice ``i``."""
        return self._sent[i]

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output's content and the calls kept."""
        content, calls = self.parser.parse(text)
        return content, calls if self.parallel else calls[:1]

    @staticmethod
    def message_content(content: str, calls: int) -> str | None:
        """A whole message's content: None for a message of calls and whitespace."""
        return None if calls and not content.strip() else content

    @staticmethod
    def finish_reason(reason: str | None, calls: int) -> str:
        """``tool_calls`` for a message with calls that ended by itself, else ``reason``."""
        reason = reason or "stop"
        return "tool_calls" if calls and reason == "stop" else reason


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive pieces of one call as one piece."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and last.index == d.index and d.id is None:
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + d.arguments)
        else:
            out.append(d)
    return out
