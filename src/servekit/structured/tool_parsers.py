"""Tool-call formats besides Hermes, and the choice of a format from a chat template.

- **Llama 3 JSON** (:class:`Llama3JsonToolParser`): the output is the call itself, a JSON
  object ``{"name": ..., "parameters": {...}}`` (``"arguments"`` accepted too), optionally after
  ``<|python_tag|>``, several separated by ``;``. Text that does not start like that is content.
- **Mistral** (:class:`MistralToolParser`): content, then ``[TOOL_CALLS]`` and a JSON array of
  ``{"name": ..., "arguments": {...}}``; call ids are 9 letters and digits, as Mistral's
  templates require.

Both stream by releasing content while no call can have started and holding the rest, parsed
whole at the end (each call then goes out as one :class:`ToolCallDelta`), so streamed calls
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
    _new_id,
    _partial_suffix,
    call_deltas,
    call_from_object,
    guided_for_tool_choice,
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


# -- Llama 3 ---------------------------------------------------------------------------------

class Llama3JsonToolParser:
    """Llama 3.1+ JSON tool calls (the model's whole output is the call)."""

    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|>

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: all calls, or all content."""
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        elif not body.startswith("{"):
            return text, []
        calls = _calls(_decode_objects(body, ";"), ("parameters", "arguments"), _new_id)
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


class _LlamaStream:
    """Undecided while the output could still be a call's start; then content or a held call."""

    __slots__ = ("_buffer", "_mode", "_parser")

    def __init__(self, parser: Llama3JsonToolParser) -> None:
        self._parser = parser
        self._buffer = ""
        self._mode = ""  # "", "content" or "call"

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode == "content":
            return delta, []
        self._buffer += delta
        if self._mode == "call":
            return "", []
        head = self._buffer.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return "", []  # nothing decisive yet
        if head.startswith(("{", PYTHON_TAG)):
            self._mode = "call"
            return "", []
        self._mode, out, self._buffer = "content", self._buffer, ""
        return out, []

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._buffer = self._buffer, ""
        if self._mode == "content" or not text:
            return text, []
        content, calls = self._parser.parse(text)
        return content, call_deltas(calls, 0)


# -- Mistral ---------------------------------------------------------------------------------

def _mistral_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class MistralToolParser:
    """Mistral's ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS]

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: the text before the tag, and the calls after it."""
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
    """Content until ``[TOOL_CALLS]`` (a partial tag held back), then the calls, held."""

    __slots__ = ("_buffer", "_inside", "_parser")

    def __init__(self, parser: MistralToolParser) -> None:
        self._parser = parser
        self._buffer = ""
        self._inside = False

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += delta
        if self._inside:
            return "", []
        start = self._buffer.find(TOOL_CALLS)
        if start >= 0:
            out, self._buffer, self._inside = self._buffer[:start], self._buffer[start:], True
            return out, []
        keep = _partial_suffix(self._buffer, TOOL_CALLS)
        cut = len(self._buffer) - keep
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, []

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._buffer, self._inside = self._buffer, "", False
        if not text.startswith(TOOL_CALLS):
            return text, []
        content, calls = self._parser.parse(text)
        return content, call_deltas(calls, 0)
