"""The gateway's view of a replica's tokenizer: prompt token ids and their KV block hashes.

Built from the replica's info document (:mod:`servekit.server.replica_api`): a Hugging Face
tokenizer rebuilt from its files with transformers' tokenizer classes (no torch), or the fake
engine's byte-level one. Prompts are encoded as the replica encodes them (text with special
tokens; chat through the chat template with the request's ``tools`` unless ``tool_choice`` is
``"none"``, earlier tool calls and results included, without adding special tokens twice), so
the chained block hashes (:mod:`servekit.kv.hashing`, same salt rule) equal the replica's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from servekit._optional import require
from servekit.kv.hashing import extend_block_hashes, get_hash_fn
from servekit.protocol.messages import openai_messages, template_messages

_BYTES_BOS = 256  # the fake engine's byte-level tokenizer: ids 0..255 are bytes, 256 is bos


class PromptEncoder:
    """Token ids and block hashes of requests, as replica ``info`` computes them."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.block_size = int(info["block_size"])
        self._hash_fn = get_hash_fn(str(info.get("hash_algorithm", "xxhash")))
        tok = info["tokenizer"]
        self._tokenizer: Any = None
        if tok.get("kind") == "files":
            transformers = require("transformers", "gateway")
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in tok["files"].items():
                    (Path(tmp) / Path(name).name).write_text(text)
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens)."""
        if self._tokenizer is None:
            return [_BYTES_BOS, *prompt.encode()]
        return list(self._tokenizer.encode(prompt, add_special_tokens=True))

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of chat ``messages`` (and ``tools``) rendered with the chat template."""
        if self._tokenizer is None:
            text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages)
            return list((text + "assistant:").encode())
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        text = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False, **extra)
        return list(self._tokenizer.encode(str(text), add_special_tokens=False))

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """The chained hashes of the full blocks of ``token_ids``."""
        hashes: list[int] = []
        extend_block_hashes(hashes, token_ids, self.block_size,
                            len(token_ids) // self.block_size, cache_salt, self._hash_fn)
        return hashes

    def request_ids(self, path: str, body: Mapping[str, Any]) -> list[int] | None:
        """The prompt ids of an OpenAI request body (None when it has no single prompt)."""
        try:
            if path.endswith("/chat/completions"):
                messages = body.get("messages")
                if isinstance(messages, list) and messages:
                    tools = body.get("tools") if body.get("tool_choice") != "none" else None
                    return self.chat_ids(template_messages(openai_messages(messages)), tools)
                return None
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return self.prompt_ids(prompt)
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)
        except Exception:  # a malformed body is the replica's to reject, not the router's
            return None
        return None
