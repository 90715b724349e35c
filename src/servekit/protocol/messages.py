"""Chat messages as a model's chat template takes them, from the API's message shapes.

Shared by the servers (HTTP and gRPC render the prompt with it) and the gateway (which renders
the same prompt to route by its KV blocks), so both produce the same token ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from servekit.protocol.errors import InvalidRequestError

__all__ = ["openai_messages", "template_messages"]


def template_messages(messages: Sequence[Mapping[str, Any]], root: str = "messages",
                      at: str = ".[{}]") -> list[dict[str, Any]]:
    """Messages (``role``, ``content``, optional ``name``, ``tool_call_id`` and ``tool_calls``
    as ``{"id", "name", "arguments"}`` with JSON text arguments) as the chat template takes
    them. Errors name ``root`` + ``at.format(i)`` + the field (``messages.[2].tool_call_id``
    over HTTP, ``chat.messages[2].tool_call_id`` over gRPC)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        field = root + at.format(i)
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
        if m.get("name"):
            msg["name"] = m["name"]
        calls = m.get("tool_calls")
        if calls:
            if m["role"] != "assistant":
                raise InvalidRequestError(
                    f"Invalid value for '{field}.tool_calls': only assistant messages "
                    "carry tool calls", param=f"{field}.tool_calls")
            msg["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": {
                    "name": call["name"],
                    "arguments": _arguments(call["arguments"],
                                            f"{field}.tool_calls{at.format(j)}.function.arguments")}}
                for j, call in enumerate(calls)]
        if m["role"] == "tool":
            if not m.get("tool_call_id"):
                raise InvalidRequestError(
                    f"Missing required parameter: '{field}.tool_call_id'",
                    param=f"{field}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
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


def openai_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI request messages (plain JSON; content as text or text parts, ``tool_calls`` as
    ``{"id", "type", "function": {"name", "arguments"}}``) as :func:`template_messages` takes
    them. Malformed entries raise (KeyError, TypeError): a caller validates first or gives up."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        out.append({"role": m["role"], "content": content or "", "name": m.get("name"),
                    "tool_call_id": m.get("tool_call_id"),
                    "tool_calls": [{"id": c["id"], "name": c["function"]["name"],
                                    "arguments": c["function"]["arguments"]}
                                   for c in m.get("tool_calls") or ()]})
    return out
