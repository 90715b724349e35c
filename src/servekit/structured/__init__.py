"""Constrained decoding: JSON schema, regex, grammar and choice constraints as token masks.

Install with ``pip install 'servekit[structured]'`` (xgrammar). The engine uses it when a
request's :class:`~servekit.sched.params.SamplingParams` carries ``guided``.
"""

from servekit.sched.params import GuidedDecoding
from servekit.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from servekit.structured.compiler import GrammarCompiler

__all__ = [
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarCompiler",
    "GrammarMatcher",
    "GuidedDecoding",
]
