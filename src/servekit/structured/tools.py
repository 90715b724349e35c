"""Tool calls: the Hermes/Qwen ``<tool_call>`` format, parsed from text and enforced by grammar.

The model writes each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
:class:`HermesToolParser` turns finished text into content plus :class:`ToolCall` objects, and
:class:`HermesToolStream` does the same incrementally: content is released as soon as it cannot
be the start of a tag, and each call is released whole when its closing tag arrives, so the
streamed argument fragments concatenate exactly to the final arguments.
:func:`guided_for_tool_choice` builds the grammar that forces a call (``required`` or a named
function), so the call is valid even from a model never trained on tools.

Front ends use a parser through the small :class:`ToolParser` interface, picked from the
model's chat template by :func:`servekit.structured.tool_parsers.tool_parser_for` (which also
holds the Llama 3 JSON and Mistral formats).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from attrs import frozen

from servekit._optional import require
from servekit.sched.params import GuidedDecoding, InvalidParameterError

__all__ = ["HermesToolParser", "HermesToolStream", "ToolCall", "ToolParser", "ToolStream",
           "guided_for_tool_choice", "tool_names"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@frozen(slots=True)
class ToolCall:
    """One call: ``arguments`` is the JSON text of the arguments object (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def call_from_object(obj: Any, keys: Sequence[str] = ("arguments",),
                     new_id: Callable[[], str] = _new_id) -> ToolCall | None:
    """The call a decoded JSON object describes: ``{"name": ..., <key>: {...}}`` with the
    arguments under the first of ``keys`` present (an object, or a JSON string of one, as some
    models send); None when it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _parse_call(body: str) -> ToolCall | None:
    try:
        return call_from_object(json.loads(body))
    except ValueError:
        return None


class ToolStream(Protocol):
    """Incremental parsing of one output: content safe to emit now, and finished calls."""

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Content released by ``delta`` and the calls it completed."""
        ...

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end of the output: what is left (an unfinished call comes back as content)."""
        ...


class ToolParser(Protocol):
    """A model family's tool-call format: parse finished or streamed text, force a call.

    ``needs_special_tokens``: the format's tags are special tokens on the family's real
    tokenizers, so a front end decodes the output with ``skip_special_tokens=False``.
    """

    name: str
    needs_special_tokens: bool

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a finished output."""
        ...

    def stream(self) -> ToolStream:
        """A fresh incremental parser for one output."""
        ...

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None) -> GuidedDecoding | None:
        """The constraint forcing a call for ``tool_choice`` (None for auto / none)."""
        ...


class HermesToolParser:
    """Splits finished text into content and tool calls (unparseable blocks stay content)."""

    name = "hermes"
    needs_special_tokens = False  # Qwen's <tool_call> is an added token, but not special

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of ``text``."""
        stream = HermesToolStream()
        content, calls = stream.feed(text)
        rest, more = stream.flush()
        return content + rest, calls + more

    def stream(self) -> HermesToolStream:
        """A fresh :class:`HermesToolStream`."""
        return HermesToolStream()

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None) -> GuidedDecoding | None:
        """:func:`guided_for_tool_choice`."""
        return guided_for_tool_choice(tools, tool_choice)


class HermesToolStream:
    """Incremental :class:`HermesToolParser`: feed text deltas, get (content, finished calls)."""

    __slots__ = ("_buffer", "_inside")

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Content safe to emit now and the calls completed by ``delta``."""
        self._buffer += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(CLOSE):]
                self._inside = False
                call = _parse_call(body.strip())
                if call is not None:
                    calls.append(call)
                else:
                    content.append(OPEN + body + CLOSE)
            else:
                start = self._buffer.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN):]
                self._inside = True
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end of the output: what is left (an unclosed call is returned as content)."""
        rest = (OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def tool_names(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each function tool's parameters schema by name; errors name ``tools[i]...``."""
    out: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidParameterError(f"tools[{i}].type", "must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParameterError(f"tools[{i}].function.name", "must be a non-empty string")
        if fn["name"] in out:
            raise InvalidParameterError(f"tools[{i}].function.name",
                                        f"{fn['name']!r} is the name of an earlier tool")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise InvalidParameterError(f"tools[{i}].function.parameters",
                                        "must be a JSON schema of type object")
        out[fn["name"]] = params
    return out


def guided_for_tool_choice(tools: Sequence[Mapping[str, Any]],
                           tool_choice: str | Mapping[str, Any] | None, *,
                           prefix: str = OPEN + "\n", suffix: str = "\n" + CLOSE,
                           arguments_key: str = "arguments") -> GuidedDecoding | None:
    """The constraint forcing a tool call for ``tool_choice`` (None for auto / none).

    ``"required"``: one call to any of ``tools``; ``{"type": "function", "function": {"name":
    N}}``: one call to ``N`` (unknown names raise InvalidParameterError on ``tool_choice``).
    The call is ``prefix`` + compact JSON ``{"name": ..., arguments_key: {...}}`` + ``suffix``
    (Hermes' tags by default; other formats pass their own).
    """
    names = tool_names(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        chosen = list(names)
        if not chosen:
            raise InvalidParameterError("tool_choice", "'required' needs at least one tool")
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in names:
            raise InvalidParameterError("tool_choice.function.name",
                                        f"{name!r} is not one of the tools")
        chosen = [str(name)]
    else:
        raise InvalidParameterError("tool_choice", "must be auto, none, required or a function")
    calls = [{"type": "object", "properties": {"name": {"const": n}, arguments_key: names[n]},
              "required": ["name", arguments_key], "additionalProperties": False}
             for n in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    xgr = require("xgrammar", "structured")
    try:
        body = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                            separators=(",", ":"))
    except Exception as exc:
        raise _unusable_schema(xgr, tools, exc) from exc
    parts = [xgr.Grammar.from_ebnf(f"root ::= {_literal(prefix)}")] if prefix else []
    parts.append(body)
    if suffix:
        parts.append(xgr.Grammar.from_ebnf(f"root ::= {_literal(suffix)}"))
    grammar = xgr.Grammar.concat(*parts) if len(parts) > 1 else body
    return GuidedDecoding.grammar(str(grammar))


def _literal(text: str) -> str:
    """``text`` as an EBNF string literal (JSON's escapes are EBNF's)."""
    return json.dumps(text, ensure_ascii=False)


def _unusable_schema(xgr: Any, tools: Sequence[Mapping[str, Any]],
                     exc: Exception) -> InvalidParameterError:
    """The error naming the first tool whose parameters schema xgrammar cannot use."""
    for i, tool in enumerate(tools):
        params = tool["function"].get("parameters", {"type": "object"})
        try:
            xgr.Grammar.from_json_schema(json.dumps(params), any_whitespace=False)
        except Exception as own:
            return InvalidParameterError(f"tools[{i}].function.parameters",
                                         f"unusable JSON schema: {own}")
    return InvalidParameterError("tools", f"the parameters schemas are unusable together: {exc}")
