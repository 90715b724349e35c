"""The gateway renders a chat prompt as the replica does, ``tools`` and tool history included,
so requests with the same tools share KV blocks and route together."""

from __future__ import annotations

from typing import Any

import pytest

from servekit.engine.chat import render_chat
from servekit.gateway.tokens import PromptEncoder
from servekit.protocol.schema import ChatCompletionRequest
from servekit.server.cli import DEMO_MODEL
from servekit.server.replica_api import tokenizer_info
from servekit.server.tools import chat_messages

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather now.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Weather in Rome?"}]
HISTORY = [*USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def replica_ids(tokenizer: Any, body: dict[str, Any]) -> list[int]:
    """What the replica's chat handler renders (tools unless tool_choice is none)."""
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    if tools:
        return render_chat(tokenizer, chat_messages(req), tools=tools)
    return render_chat(tokenizer, chat_messages(req))


@pytest.mark.parametrize("body", [
    {"messages": USER, "tools": [WEATHER]},
    {"messages": USER, "tools": [WEATHER], "tool_choice": "none"},
    {"messages": HISTORY, "tools": [WEATHER], "tool_choice": "auto"},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
])
def test_the_gateway_renders_chat_as_the_replica(tokenizer: Any, body: dict[str, Any]) -> None:
    encoder = PromptEncoder({"block_size": 16, "tokenizer": tokenizer_info(tokenizer)})
    ids = encoder.request_ids("/v1/chat/completions", body)
    assert ids == replica_ids(tokenizer, body)
    without = encoder.request_ids("/v1/chat/completions", {"messages": body["messages"]})
    # the tools section is part of the prompt (and of its block hashes) unless not offered
    assert (ids != without) == ("tools" in body and body.get("tool_choice") != "none")
    if ids != without:
        assert encoder.block_hashes(ids) != encoder.block_hashes(without)
