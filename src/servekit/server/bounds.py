"""Size bounds checked before any expensive work: request bodies and prompt characters.

A prompt of ``c`` characters has at least ``c / longest`` tokens, where ``longest`` is the most
characters one token of the vocabulary stands for. So a text longer than
``max_model_len * longest`` characters can never fit the context and is rejected without
tokenizing it; a factor of 2 leaves room for normalizers that drop characters. The default
body limit fits one such prompt even if every character took 4 bytes, plus room for the rest
of the request (token-id prompts are smaller: a few bytes per id).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIN_BODY_BYTES", "default_max_body_bytes", "max_prompt_chars", "max_token_chars"]

#: The smallest default body limit (1 MiB).
MIN_BODY_BYTES = 2**20
_SLACK = 2  # characters a normalizer may drop, per character kept (see the module docstring)
_BODY_EXTRA = 64 * 2**10  # room for the request's other fields


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for, read from the vocabulary.

    A vocabulary piece is never shorter than its text (byte-level pieces hold one character
    per byte, SentencePiece's ``▁`` is one space), so the longest piece bounds it. Tokenizers
    without ``get_vocab`` are asked to decode each id (fine for small vocabularies).
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        pieces = get_vocab()
        if pieces:
            return max(1, max(len(p) for p in pieces))
    return max(1, max(len(tokenizer.decode([i])) for i in range(len(tokenizer))))


def max_prompt_chars(max_model_len: int, token_chars: int) -> int:
    """Characters above which a text prompt cannot fit ``max_model_len`` tokens."""
    return _SLACK * max_model_len * token_chars


def default_max_body_bytes(max_model_len: int, token_chars: int) -> int:
    """The default body limit: one prompt of the longest context, at 4 bytes a character."""
    return max(MIN_BODY_BYTES, 4 * max_prompt_chars(max_model_len, token_chars) + _BODY_EXTRA)
