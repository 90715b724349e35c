"""Incremental detokenization: turn a stream of token ids into a stream of valid UTF-8 text.

A character split across tokens (byte-level BPE pieces of a multi-byte character) is held
back until its last byte arrives, so no delta ever contains a replacement character that the
full decode would not. Fast (Rust) tokenizers use ``tokenizers``' ``DecodeStream``; any other
tokenizer uses the prefix/read-offset window of TGI and vLLM over ``tokenizer.decode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for spacing


class IncrementalDetokenizer:
    """Per-request text stream: ``step(token_id)`` returns the text that token completes."""

    __slots__ = ("_backend", "_ids", "_prefix", "_read", "_skip_special", "_stream", "_tokenizer")

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: Any = None
        self._backend: Any = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            context = list(prompt_ids[-_CONTEXT_TOKENS:])
            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            self._ids: list[int] = []
        else:
            self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is partial)."""
        if self._stream is not None:
            text = self._stream.step(self._backend, token_id)
            return text if text is not None else ""
        ids = self._ids
        ids.append(token_id)
        decode = self._tokenizer.decode
        skip = self._skip_special
        before = decode(ids[self._prefix : self._read], skip_special_tokens=skip)
        after = decode(ids[self._prefix :], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix = self._read
            self._read = len(ids)
            return str(after[len(before) :])
        return ""
