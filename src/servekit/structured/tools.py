"""Tool calls: the Hermes/Qwen ``<tool_call>`` format, parsed from text and enforced by grammar.

The model writes each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
:class:`HermesToolParser` turns finished text into content plus :class:`ToolCall` objects, and
:class:`HermesToolStream` does the same incrementally, as :class:`ToolCallDelta` pieces: content
is released as soon as it cannot be the start of a tag, a call's id and name as soon as its
head is in, then its arguments text as the model writes it. The parser joins what the stream
produces, so streamed argument fragments concatenate exactly to the final arguments.
:func:`guided_for_tool_choice` builds the grammar that forces a call (``required`` or a named
function), so the call is valid even from a model never trained on tools.

Front ends use a parser through the small :class:`ToolParser` interface, picked from the
model's chat template by :func:`servekit.structured.tool_parsers.tool_parser_for` (which also
holds the Llama 3 JSON and Mistral formats).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from attrs import frozen

from servekit._optional import require
from servekit.sched.params import GuidedDecoding, InvalidParameterError

__all__ = [
    "HermesToolParser",
    "HermesToolStream",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolStream",
    "call_deltas",
    "collect_calls",
    "guided_for_tool_choice",
    "parse_streamed",
    "tool_names",
]

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


@frozen(slots=True)
class ToolCallDelta:
    """A piece of a streamed call. ``index``: the call's place among the output's calls; a
    call's first piece carries its ``id`` and ``name``, and the ``arguments`` of its pieces
    concatenate to the call's arguments (OpenAI's ``delta.tool_calls`` entries)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def call_deltas(calls: Sequence[ToolCall], start: int) -> list[ToolCallDelta]:
    """Whole calls as one delta each, numbered from ``start``."""
    return [ToolCallDelta(start + k, c.id, c.name, c.arguments) for k, c in enumerate(calls)]


def collect_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """The calls a stream's deltas describe (fragments joined per index, in index order)."""
    heads: dict[int, ToolCallDelta] = {}
    args: dict[int, list[str]] = {}
    for d in deltas:
        if d.id is not None:
            heads.setdefault(d.index, d)
        args.setdefault(d.index, []).append(d.arguments)
    return [ToolCall(h.id or "", h.name or "", "".join(args[i]))
            for i, h in sorted(heads.items())]


class ToolStream(Protocol):
    """Incremental parsing of one output: content safe to emit now, and call deltas."""

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Content released by ``delta`` and the pieces of calls it produced."""
        ...

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: what is left (a call cut before its head went out comes
        back as content; one cut later keeps the arguments sent so far)."""
        ...


def parse_streamed(stream: ToolStream, text: str) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a finished ``text``: what ``stream`` yields for it, joined (so a
    parser's whole and streamed results cannot differ)."""
    content, deltas = stream.feed(text)
    rest, more = stream.flush()
    return content + rest, collect_calls(deltas + more)


class ToolParser(Protocol):
    """A model family's tool-call format: parse finished or streamed text, force a call.

    ``needs_special_tokens``: the format's tags are special tokens on the family's real
    tokenizers, so a front end decodes the output with ``skip_special_tokens=False``.
    """

    name: str
    needs_special_tokens: bool

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a finished output: what :meth:`stream` yields, joined."""
        ...

    def stream(self) -> ToolStream:
        """A fresh incremental parser for one output."""
        ...

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None,
               parallel: bool = False) -> GuidedDecoding | None:
        """The constraint forcing calls for ``tool_choice`` (None for auto / none): with
        ``parallel``, ``required`` allows one or more calls."""
        ...


class HermesToolParser:
    """Splits finished text into content and tool calls (unparseable blocks stay content)."""

    name = "hermes"
    needs_special_tokens = False  # Qwen's <tool_call> is an added token, but not special

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of ``text``: what :class:`HermesToolStream` streams, joined."""
        return parse_streamed(HermesToolStream(), text)

    def stream(self) -> HermesToolStream:
        """A fresh :class:`HermesToolStream`."""
        return HermesToolStream()

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None,
               parallel: bool = False) -> GuidedDecoding | None:
        """:func:`guided_for_tool_choice` (several calls: one tag after another)."""
        return guided_for_tool_choice(tools, tool_choice, parallel=parallel)


def _head_pattern(keys: Sequence[str]) -> re.Pattern[str]:
    """The head of a call whose arguments can stream: ``{"name": "...", "<key>": `` before the
    arguments object's ``{`` (the order the grammar writes and models are trained on)."""
    ws = r"[ \t\n\r]*"
    key = "|".join(re.escape(k) for k in keys)
    return re.compile(rf'{ws}\{{{ws}"name"{ws}:{ws}("(?:[^"\\]|\\.)*"){ws},{ws}"(?:{key})"{ws}:{ws}'
                      r"(?=\{)")


_HEAD = _head_pattern(("arguments",))


class _StreamedCall:
    """One call's arguments object as it arrives: the text of the object so far, and whether
    it has closed (JSON strings and nesting tracked, so braces in strings do not count)."""

    __slots__ = ("closed", "depth", "escape", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escape = self.closed = False

    def take(self, text: str) -> str:
        """The part of ``text`` that belongs to the arguments object."""
        for k, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.closed = True
                    return text[:k + 1]
        return text


class HermesToolStream:
    """Incremental :class:`HermesToolParser`: feed text deltas, get (content, call deltas).

    Content is released as soon as it cannot start a tag. Inside a tag, once the call's head
    ``{"name": ..., "arguments": `` has arrived, the call's id and name go out, then the
    arguments object's text as it grows: the call's arguments are the exact text the model
    wrote. Any other call shape is parsed whole at ``</tool_call>`` (arguments re-serialised),
    and a block that is not a call is content. A call whose head went out stays a call, cut
    where the output or its tag ended.
    """

    __slots__ = ("_args", "_body", "_buffer", "_calls", "_inside", "_sent")

    def __init__(self) -> None:
        self._buffer = ""  # outside a tag: text not yet released
        self._inside = False
        self._body = ""  # inside a tag: the text after <tool_call> so far
        self._sent = 0  # how much of _body has been looked at for arguments
        self._args: _StreamedCall | None = None  # the streaming call, once its head is out
        self._calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Content safe to emit now and the call deltas ``delta`` produced."""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        text = delta
        while True:
            if self._inside:
                seen = max(0, len(self._body) - len(CLOSE) + 1)  # no tag ends before this
                self._body += text
                text = ""
                end = self._body.find(CLOSE, seen)
                if end < 0:
                    self._advance(len(self._body) - _partial_suffix(self._body, CLOSE), deltas)
                    break
                text = self._body[end + len(CLOSE):]
                self._body = self._body[:end]
                self._advance(end, deltas)
                content.append(self._close(deltas))
            else:
                self._buffer += text
                text = ""
                start = self._buffer.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                text, self._buffer = self._buffer[start + len(OPEN):], ""
                self._inside, self._body, self._sent, self._args = True, "", 0, None
        return "".join(content), deltas

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: what is left (an unclosed call is returned as content,
        unless its head already went out: then its arguments end where the output did)."""
        deltas: list[ToolCallDelta] = []
        rest = self._buffer
        if self._inside:
            self._advance(len(self._body), deltas)
            rest = ("" if self._args is not None else OPEN + self._body) + rest
        self._buffer, self._inside, self._body, self._args = "", False, "", None
        return rest, deltas

    def _advance(self, upto: int, deltas: list[ToolCallDelta]) -> None:
        """Stream the arguments in ``_body[:upto]`` (sending the head first when it is in)."""
        if self._args is None:
            head = _HEAD.match(self._body, 0, upto)
            try:
                name = json.loads(head.group(1)) if head is not None else None
            except ValueError:  # a bad escape in the name: parsed whole at the end
                name = None
            if head is None or name is None:
                return
            self._args = _StreamedCall()
            deltas.append(ToolCallDelta(self._calls, _new_id(), name))
            self._calls += 1
            self._sent = head.end()
        if upto > self._sent and not self._args.closed:
            piece = self._args.take(self._body[self._sent:upto])
            if piece:
                deltas.append(ToolCallDelta(self._calls - 1, arguments=piece))
        self._sent = max(self._sent, upto)

    def _close(self, deltas: list[ToolCallDelta]) -> str:
        """``</tool_call>`` arrived: the content the block leaves (none when it was a call)."""
        body, streamed = self._body, self._args is not None
        self._inside, self._body, self._args = False, "", None
        if streamed:
            return ""
        call = _parse_call(body.strip())
        if call is None:
            return OPEN + body + CLOSE
        deltas.extend(call_deltas([call], self._calls))
        self._calls += 1
        return ""


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


#: The rule of :func:`guided_for_tool_choice`'s grammar around the call schema's ``root``.
_CALLS_RULE = "servekit_tool_calls"


def guided_for_tool_choice(tools: Sequence[Mapping[str, Any]],
                           tool_choice: str | Mapping[str, Any] | None, *,
                           prefix: str = OPEN + "\n", suffix: str = "\n" + CLOSE,
                           arguments_key: str = "arguments",
                           separator: str = "\n" + CLOSE + OPEN + "\n",
                           parallel: bool = False) -> GuidedDecoding | None:
    """The constraint forcing tool calls for ``tool_choice`` (None for auto / none).

    ``"required"``: a call to any of ``tools`` (with ``parallel``, one or more calls, each to
    any tool); ``{"type": "function", "function": {"name": N}}``: one call to ``N`` (unknown
    names raise InvalidParameterError on ``tool_choice``). A call is compact JSON
    ``{"name": ..., arguments_key: {...}}`` valid against its tool's parameters; the output is
    ``prefix`` + the calls joined by ``separator`` + ``suffix`` (Hermes' tags by default;
    other formats pass their own).
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
        chosen, parallel = [str(name)], False
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
    sequence = f"root ({_literal(separator)} root)*" if parallel else "root"
    rule = " ".join(part for part in (_literal(prefix) if prefix else "", sequence,
                                      _literal(suffix) if suffix else "") if part)
    if rule == "root":
        return GuidedDecoding.grammar(str(body))
    grammar = xgr.Grammar.from_ebnf(f"{body}\n{_CALLS_RULE} ::= {rule}\n",
                                    root_rule_name=_CALLS_RULE)
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
