"""Tool-call formats besides Hermes, and the choice of a format from a chat template.

- **Llama 3 JSON** (:class:`Llama3JsonToolParser`): the output is the call itself, a JSON
  object ``{"name": ..., "parameters": {...}}`` (``"arguments"`` accepted too), optionally after
  ``<|python_tag|>``, several separated by ``;``. Text that does not start like that is content.
- **Mistral** (:class:`MistralToolParser`): content, then ``[TOOL_CALLS]`` and a JSON array of
  ``{"name": ..., "arguments": {...}}``; call ids are 9 letters and digits, as Mistral's
  templates require.

Both stream content while no call can have started; then each call's id and name as soon as
its head ``{"name": ..., "<key>": `` is in, and its arguments text as the model writes it
(:class:`_StreamedCalls`). A call region in another shape is held and parsed whole at the end
(arguments re-serialised). Parsing a finished text is its stream joined, so streamed calls
equal parsed ones. A call region that does not parse is
returned as content. Real Llama / Mistral tokenizers mark ``<|python_tag|>`` and
``[TOOL_CALLS]`` as special tokens, so both parsers set ``needs_special_tokens``: the servers
then decode such a request's output with ``skip_special_tokens=False``.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from servekit.sched.params import GuidedDecoding
from servekit.structured.tools import (
    HermesToolParser,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    _head_pattern,
    _new_id,
    _partial_suffix,
    _StreamedCall,
    call_deltas,
    call_from_object,
    guided_for_tool_choice,
    parse_streamed,
)

__all__ = ["Llama3JsonToolParser", "MistralToolParser", "tool_parser_for"]

PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS = "[TOOL_CALLS]"
_ALNUM = string.ascii_letters + string.digits


def tool_parser_for(chat_template: str | None) -> ToolParser:
    """The parser of the format ``chat_template`` renders tool calls in: Mistral when it holds
    ``[TOOL_CALLS]``, Llama 3 JSON when it holds ``<|python_tag|>`` (and no ``<tool_call>``),
    else Hermes — also for templates without tools, since servekit forces calls by grammar."""
    template = chat_template or ""
    if TOOL_CALLS in template:
        return MistralToolParser()
    if PYTHON_TAG in template and "<tool_call>" not in template:
        return Llama3JsonToolParser()
    return HermesToolParser()


def _decode_objects(text: str, separator: str) -> list[Any] | None:
    """The JSON values of ``text``, separated by ``separator`` and whitespace; None if not."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or (values and text[i] == separator)):
            i += 1
        if i == len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _calls(values: list[Any] | None, keys: Sequence[str],
           new_id: Callable[[], str]) -> list[ToolCall] | None:
    if not values:
        return None
    calls = [call_from_object(v, keys, new_id) for v in values]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


class _StreamedCalls:
    """Calls written as JSON objects one after another (``opener``, calls joined by
    ``separator``, ``closer``: Mistral's array, Llama 3's ``;`` list) as the text arrives.

    Each call whose head is ``{"name": ..., "<key>": `` streams (head, then its arguments
    object's text); the first text that breaks that shape stops streaming, and :meth:`rest`
    says what is left to parse whole at the end.
    """

    __slots__ = ("_args", "_closer", "_head", "_opener", "calls", "keys", "new_id", "pos",
                 "separator", "state", "text")

    def __init__(self, keys: Sequence[str], new_id: Callable[[], str], opener: str | None,
                 separator: str, closer: str | None) -> None:
        self._head = _head_pattern(keys)
        self.keys, self.new_id = keys, new_id
        self._opener, self.separator, self._closer = opener, separator, closer
        self._args: _StreamedCall | None = None
        self.text = ""
        self.pos = 0  # text before pos is accounted for
        self.calls = 0  # calls whose head went out
        self.state = "open" if opener else "call"  # open, call, args, tail, after, done, broken

    def feed(self, delta: str) -> list[ToolCallDelta]:
        """The call pieces ``delta`` completes."""
        self.text += delta
        out: list[ToolCallDelta] = []
        while self._step(out):
            pass
        return out

    def _skip_space(self) -> str | None:
        """The next character that is not whitespace (None: none yet)."""
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else None

    def _step(self, out: list[ToolCallDelta]) -> bool:
        """Advance one state; False when more text is needed (or streaming stopped)."""
        state = self.state
        if state == "args":
            assert self._args is not None
            piece = self._args.take(self.text[self.pos:])
            self.pos += len(piece)
            if piece:
                out.append(ToolCallDelta(self.calls - 1, arguments=piece))
            if self._args.closed:
                self.state = "tail"
            return self._args.closed
        if state == "call":
            head = self._head.match(self.text, self.pos)
            if head is None:
                nxt = self._skip_space()
                if nxt is not None and nxt != "{":
                    self.state = "broken"
                return False  # wait for the head (or give up at the end)
            try:
                name = json.loads(head.group(1))
            except ValueError:
                self.state = "broken"
                return False
            out.append(ToolCallDelta(self.calls, self.new_id(), name))
            self.calls += 1
            self.pos, self.state, self._args = head.end(), "args", _StreamedCall()
            return True
        if state in ("done", "broken"):
            return False
        nxt = self._skip_space()
        if nxt is None:
            return False
        expected = {"open": self._opener, "tail": "}"}.get(state)
        if state == "after":
            if nxt == self.separator:
                self.pos, self.state = self.pos + 1, "call"
            elif nxt == self._closer:
                self.pos, self.state = self.pos + 1, "done"
            else:
                self.state = "broken"
            return self.state != "broken"
        if nxt != expected:
            self.state = "broken"
            return False
        self.pos += 1
        self.state = "call" if state == "open" else "after"
        return True

    def rest(self) -> str:
        """The text not streamed (what a format parses whole at the end)."""
        return self.text[self.pos:]

    def cut_inside_a_call(self) -> bool:
        """The text ended inside a streamed call (its arguments stay as they were cut)."""
        return self.state in ("args", "tail")


def _finish(stream: _StreamedCalls, whole: Callable[[str], tuple[str, list[ToolCall]]],
            before: str, closer: str | None) -> tuple[str, list[ToolCallDelta]]:
    """The end of a call region: nothing streamed, ``before`` + the region is parsed whole;
    else what is left after the streamed calls: more calls parsed whole, or content."""
    if stream.calls == 0:
        content, calls = whole(before + stream.text)
        return content, call_deltas(calls, 0)
    rest = stream.rest()
    if stream.cut_inside_a_call() or not rest.strip() or rest.strip() == closer:
        return "", []
    body = rest.rstrip()
    if closer and stream.state != "done" and body.endswith(closer):
        body = body[: -len(closer)]
    values = _decode_objects(body, stream.separator) if stream.state != "done" else None
    more = _calls(values, stream.keys, stream.new_id) if values else None
    if more is None:
        return rest, []
    return "", call_deltas(more, stream.calls)


# -- Llama 3 ---------------------------------------------------------------------------------

class Llama3JsonToolParser:
    """Llama 3.1+ JSON tool calls (the model's whole output is the call)."""

    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|>

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: all calls, or all content (the stream joined)."""
        return parse_streamed(_LlamaStream(self), text)

    def parse_whole(self, text: str) -> tuple[str, list[ToolCall]]:
        """:meth:`parse` without streaming (arguments re-serialised): for call regions whose
        calls cannot stream."""
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        elif not body.startswith("{"):
            return text, []
        calls = _calls(_decode_objects(body, ";"), _LLAMA_KEYS, _new_id)
        return ("", calls) if calls else (text, [])

    def stream(self) -> _LlamaStream:
        """A fresh incremental parser."""
        return _LlamaStream(self)

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None,
               parallel: bool = False) -> GuidedDecoding | None:
        """Calls as ``{"name": ..., "parameters": {...}}`` (several separated by ``;``)."""
        return guided_for_tool_choice(tools, tool_choice, prefix="", suffix="",
                                      arguments_key="parameters", separator=";",
                                      parallel=parallel)


_LLAMA_KEYS = ("parameters", "arguments")


class _LlamaStream:
    """Undecided while the output could still be a call's start; then content, or calls."""

    __slots__ = ("_before", "_buffer", "_calls", "_mode", "_parser")

    def __init__(self, parser: Llama3JsonToolParser) -> None:
        self._parser = parser
        self._buffer = ""
        self._mode = ""  # "", "content" or "call"
        self._before = ""  # a call region's leading space and tag
        self._calls: _StreamedCalls | None = None

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode == "content":
            return delta, []
        if self._calls is not None:
            return "", self._calls.feed(delta)
        self._buffer += delta
        head = self._buffer.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return "", []  # nothing decisive yet
        if head.startswith(("{", PYTHON_TAG)):
            tag = PYTHON_TAG if head.startswith(PYTHON_TAG) else ""
            self._before = self._buffer[: len(self._buffer) - len(head)] + tag
            self._mode, self._buffer = "call", ""
            self._calls = _StreamedCalls(_LLAMA_KEYS, _new_id, None, ";", None)
            return "", self._calls.feed(head[len(tag):])
        self._mode, out, self._buffer = "content", self._buffer, ""
        return out, []

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._buffer = self._buffer, ""
        if self._calls is None:
            return text, []
        calls, self._calls = self._calls, None
        return _finish(calls, self._parser.parse_whole, self._before, None)


# -- Mistral ---------------------------------------------------------------------------------

def _mistral_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class MistralToolParser:
    """Mistral's ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS]

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: the text before the tag, and the calls after it (the stream
        joined)."""
        return parse_streamed(_MistralStream(self), text)

    def parse_whole(self, text: str) -> tuple[str, list[ToolCall]]:
        """:meth:`parse` without streaming (arguments re-serialised): for call regions whose
        calls cannot stream."""
        start = text.find(TOOL_CALLS)
        if start < 0:
            return text, []
        values = _decode_objects(text[start + len(TOOL_CALLS):], ",")
        array = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = _calls(array, ("arguments",), _mistral_id)
        return (text[:start], calls) if calls else (text, [])

    def stream(self) -> _MistralStream:
        """A fresh incremental parser."""
        return _MistralStream(self)

    def guided(self, tools: Sequence[Mapping[str, Any]],
               tool_choice: str | Mapping[str, Any] | None,
               parallel: bool = False) -> GuidedDecoding | None:
        """Calls as ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""
        return guided_for_tool_choice(tools, tool_choice, prefix=TOOL_CALLS + "[", suffix="]",
                                      separator=",", parallel=parallel)


class _MistralStream:
    """Content until ``[TOOL_CALLS]`` (a partial tag held back), then the calls."""

    __slots__ = ("_buffer", "_calls", "_parser")

    def __init__(self, parser: MistralToolParser) -> None:
        self._parser = parser
        self._buffer = ""
        self._calls: _StreamedCalls | None = None

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        if self._calls is not None:
            return "", self._calls.feed(delta)
        self._buffer += delta
        start = self._buffer.find(TOOL_CALLS)
        if start >= 0:
            out, region = self._buffer[:start], self._buffer[start + len(TOOL_CALLS):]
            self._buffer = ""
            self._calls = _StreamedCalls(("arguments",), _mistral_id, "[", ",", "]")
            return out, self._calls.feed(region)
        keep = _partial_suffix(self._buffer, TOOL_CALLS)
        cut = len(self._buffer) - keep
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, []

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._buffer = self._buffer, ""
        if self._calls is None:
            return text, []
        calls, self._calls = self._calls, None
        return _finish(calls, self._parser.parse_whole, TOOL_CALLS, "]")
