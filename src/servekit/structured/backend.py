"""The backend interface of constrained decoding: compile a constraint, match tokens, fill masks.

A :class:`GrammarBackend` compiles a :class:`~servekit.sched.params.GuidedDecoding` once into a
:class:`CompiledGrammar`; each request gets its own :class:`GrammarMatcher` from it. Every step
the engine asks the backend to fill one token bitmask for all constrained rows of the batch
(int32 ``[rows, ceil(vocab / 32)]``, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is
allowed: the layout xgrammar and llguidance share) and applies it to the logits before sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from servekit.sched.params import GuidedDecoding

__all__ = ["CompiledGrammar", "GrammarBackend", "GrammarMatcher", "bitmask_words"]


def bitmask_words(vocab_size: int) -> int:
    """32-bit words per bitmask row for a vocabulary of ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


@runtime_checkable
class GrammarMatcher(Protocol):
    """One request's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged) when the grammar forbids it."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""
        ...

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        ...


class CompiledGrammar(Protocol):
    """A compiled constraint: immutable, shared by every request with the same constraint."""

    def new_matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar."""
        ...


class GrammarBackend(Protocol):
    """Compiles constraints for one tokenizer and fills bitmasks for a batch of matchers."""

    name: str
    vocab_size: int

    def compile(self, spec: GuidedDecoding) -> CompiledGrammar:
        """Compile ``spec``; raise InvalidParameterError naming ``guided.<kind>`` if unusable."""
        ...

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Write row ``i`` of ``bitmask`` (int32, CPU) with ``matchers[i]``'s allowed tokens."""
        ...
