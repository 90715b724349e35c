"""``parse`` and ``run_tools``, written once on top of ``chat`` for every client (HTTP and gRPC,
sync and async): a client class mixes in :class:`ChatMethods` or :class:`AsyncChatMethods`."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from servekit.client.structured import parse_message, response_format_for
from servekit.client.tools import ToolLoop, ToolRun
from servekit.client.types import ChatCompletion

__all__ = ["AsyncChatMethods", "ChatMethods"]

Message = Mapping[str, Any]


class _Chats(Protocol):
    def chat(self, model: str, messages: Sequence[Message], **params: Any) -> ChatCompletion: ...


class _AsyncChats(Protocol):
    def chat(self, model: str, messages: Sequence[Message],
             **params: Any) -> Awaitable[ChatCompletion]: ...


class ChatMethods:
    """``parse`` and ``run_tools`` for a blocking client with ``chat`` (the class it is mixed
    into provides it)."""

    def parse(self: _Chats, model: str, messages: Sequence[Message], schema: Any, **params: Any) -> Any:
        """Chat constrained to ``schema`` (a pydantic model class or a JSON schema dict); the
        answer as a validated model instance (or parsed JSON, validated with ``jsonschema``
        when it is installed). Raises ParseError unless it ended with stop and validates."""
        done = self.chat(model, messages, response_format=response_format_for(schema), **params)
        return parse_message(done, schema)

    def run_tools(self: _Chats, model: str, messages: Sequence[Message], tools: Sequence[Any], *,
                  max_turns: int = 8, tool_choice: Any = None, **params: Any) -> ToolRun:
        """An agent loop: call the model with ``tools`` (Python functions, sync or async, or
        :func:`~servekit.client.tools.function_tool` objects), run the functions it asks for,
        send back their results, until it answers without a call or ``max_turns`` calls were
        made (then ``ToolRun.completed`` is False). ``tool_choice`` applies to the first turn
        (``"required"``, or a tool's name, forces a call); later turns are ``auto``. A call to
        an unknown tool, bad arguments or a function that raises become an error result the
        model reads, not an exception here. ``params`` go with every call."""
        loop = ToolLoop.create(messages, tools, max_turns, tool_choice)
        while loop.more:
            calls = loop.record(self.chat(model, loop.messages, **loop.request(), **params))
            if not calls:
                break
            for call in calls:
                loop.run_sync(call)
        return loop.result()


class AsyncChatMethods:
    """``parse`` and ``run_tools`` for an async client with ``chat`` (the class it is mixed
    into provides it)."""

    async def parse(self: _AsyncChats, model: str, messages: Sequence[Message], schema: Any,
                    **params: Any) -> Any:
        """The async twin of :meth:`ChatMethods.parse`."""
        done = await self.chat(model, messages, response_format=response_format_for(schema),
                               **params)
        return parse_message(done, schema)

    async def run_tools(self: _AsyncChats, model: str, messages: Sequence[Message],
                        tools: Sequence[Any], *, max_turns: int = 8, tool_choice: Any = None, **params: Any) -> ToolRun:
        """The async twin of :meth:`ChatMethods.run_tools` (sync functions run in worker
        threads)."""
        loop = ToolLoop.create(messages, tools, max_turns, tool_choice)
        while loop.more:
            calls = loop.record(await self.chat(model, loop.messages, **loop.request(), **params))
            if not calls:
                break
            for call in calls:
                await loop.run_async(call)
        return loop.result()
