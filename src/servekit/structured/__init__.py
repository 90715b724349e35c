"""Constrained decoding: JSON schema, regex, grammar and choice constraints as token masks.

Install with ``pip install 'servekit[structured]'`` (xgrammar and llguidance). The engine uses
it when a request's :class:`~servekit.sched.params.SamplingParams` carries ``guided``; its
``EngineConfig.guided_backend`` picks the backend (:func:`grammar_backend`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from servekit.sched.params import GuidedDecoding
from servekit.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from servekit.structured.compiler import GrammarCompiler

__all__ = [
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarCompiler",
    "GrammarMatcher",
    "GuidedDecoding",
    "grammar_backend",
]


def grammar_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                    *, fallback_after: float | None = None) -> GrammarBackend:
    """The backend ``name`` (``"xgrammar"`` or ``"llguidance"``) for ``tokenizer``.

    With xgrammar and ``fallback_after`` set, a constraint still compiling after that many
    seconds is served by llguidance (:class:`~servekit.structured.fallback.FallbackBackend`).
    """
    stops = list(stop_token_ids)
    if name == "llguidance":
        from servekit.structured.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, stops)
    if name != "xgrammar":
        raise ValueError(f"unknown grammar backend {name!r} (xgrammar, llguidance)")
    from servekit.structured.xgrammar_backend import XGrammarBackend

    primary = XGrammarBackend(tokenizer, vocab_size, stops)
    if fallback_after is None:
        return primary
    from servekit.structured.fallback import FallbackBackend
    from servekit.structured.llguidance_backend import LLGuidanceBackend

    return FallbackBackend(primary, LLGuidanceBackend(tokenizer, vocab_size, stops),
                           after=fallback_after)
