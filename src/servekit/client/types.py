"""Typed responses and stream chunks, parsed from the OpenAI-compatible JSON."""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen


@frozen(slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Usage | None:
        """Parse a ``usage`` object (None stays None)."""
        if not data:
            return None
        return cls(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)),
                   int(data.get("total_tokens", 0)))

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens)


@frozen(slots=True)
class CompletionChoice:
    """One choice of a completion, or its delta in a stream chunk."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@frozen(slots=True)
class Completion:
    """A ``/v1/completions`` response, or one chunk of its stream."""

    id: str
    model: str
    created: int
    choices: tuple[CompletionChoice, ...]
    usage: Usage | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        """Parse a completion or completion chunk."""
        choices = tuple(
            CompletionChoice(int(c.get("index", 0)), c.get("text") or "", c.get("finish_reason"),
                             c.get("logprobs"))
            for c in data.get("choices") or ()
        )
        return cls(str(data.get("id", "")), str(data.get("model", "")),
                   int(data.get("created", 0)), choices, Usage.from_json(data.get("usage")))

    @property
    def text(self) -> str:
        """The first choice's text ("" when there is none, e.g. a usage-only chunk)."""
        return self.choices[0].text if self.choices else ""


@frozen(slots=True)
class ToolCall:
    """A function call the model asked for; ``arguments`` is JSON text.

    In a stream chunk it is a fragment: ``index`` says which call it belongs to, and ``id``
    and ``name`` may be empty on fragments after the first.
    """

    id: str
    name: str
    arguments: str
    index: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolCall:
        """Parse one entry of ``message.tool_calls`` or ``delta.tool_calls``."""
        fn = data.get("function") or {}
        return cls(str(data.get("id") or ""), str(fn.get("name") or ""),
                   str(fn.get("arguments") or ""), int(data.get("index", 0)))

    def parsed_arguments(self) -> Any:
        """The arguments as a Python value (ValueError when they are not JSON)."""
        return json.loads(self.arguments)

    def to_json(self) -> dict[str, Any]:
        """The OpenAI shape, to send back in an assistant message."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@frozen(slots=True)
class ChatMessage:
    """A chat message (or a stream delta, whose role may be None); ``content`` is "" when the
    server sent null (a message with only tool calls)."""

    role: str | None
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@frozen(slots=True)
class ChatChoice:
    """One choice of a chat completion; ``message`` is the delta in a stream chunk."""

    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@frozen(slots=True)
class ChatCompletion:
    """A ``/v1/chat/completions`` response, or one chunk of its stream."""

    id: str
    model: str
    created: int
    choices: tuple[ChatChoice, ...]
    usage: Usage | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChatCompletion:
        """Parse a chat completion (``message``) or chunk (``delta``)."""
        choices = []
        for c in data.get("choices") or ():
            msg = c.get("message") or c.get("delta") or {}
            calls = tuple(ToolCall.from_json(t) for t in msg.get("tool_calls") or ())
            choices.append(ChatChoice(int(c.get("index", 0)),
                                      ChatMessage(msg.get("role"), msg.get("content") or "", calls),
                                      c.get("finish_reason"), c.get("logprobs")))
        return cls(str(data.get("id", "")), str(data.get("model", "")),
                   int(data.get("created", 0)), tuple(choices), Usage.from_json(data.get("usage")))

    @property
    def text(self) -> str:
        """The first choice's content ("" when there is none)."""
        return self.choices[0].message.content if self.choices else ""
