"""A backend that compiles with one backend and falls back to another when that takes long.

xgrammar compiles a grammar ahead of decoding, which is fast for ordinary schemas and
pathologically slow for a few (deep nesting, large enums, long bounded repetitions);
llguidance has no compile step. :class:`FallbackBackend` gives the primary ``after`` seconds and
then serves the constraint with the fallback instead, so one bad schema costs its requests a
short wait, not the compile time limit.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import torch

from servekit.sched.params import GuidedDecoding
from servekit.structured.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
    bitmask_words,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["FallbackBackend"]

log = logging.getLogger("servekit.structured")


class _FallbackMatcher:
    """A fallback grammar's matcher, marked so the batch fill sends its row to the fallback."""

    __slots__ = ("inner",)

    def __init__(self, inner: GrammarMatcher) -> None:
        self.inner = inner

    def accept_token(self, token_id: int) -> bool:
        return self.inner.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.inner.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()


class _FallbackCompiled:
    __slots__ = ("inner",)

    def __init__(self, inner: CompiledGrammar) -> None:
        self.inner = inner

    def new_matcher(self) -> GrammarMatcher:
        return _FallbackMatcher(self.inner.new_matcher())


class FallbackBackend:
    """Compiles with ``primary``; a compile still running after ``after`` seconds is served by
    ``fallback`` instead (the primary's compile finishes in the background and is dropped).

    Errors of the primary (an invalid schema) are errors: the fallback only covers slowness.
    ``fallbacks`` counts the constraints served by the fallback.
    """

    def __init__(self, primary: GrammarBackend, fallback: GrammarBackend, *,
                 after: float = 2.0) -> None:
        if fallback.vocab_size != primary.vocab_size:
            raise ValueError("the fallback backend must have the primary's vocabulary size")
        self.primary, self.fallback, self.after = primary, fallback, after
        self.name = f"{primary.name}, then {fallback.name}"
        self.vocab_size = primary.vocab_size
        self.fallbacks = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="servekit-grammar-primary")

    def compile(self, spec: GuidedDecoding) -> CompiledGrammar:
        """The primary's grammar if it is ready within ``after`` seconds, else the fallback's."""
        future = self._pool.submit(self.primary.compile, spec)
        try:
            return future.result(timeout=self.after)
        except FutureTimeout:
            self.fallbacks += 1
            log.warning("%s took over %.1f s to compile a %s constraint; serving it with %s",
                        self.primary.name, self.after, spec.kind, self.fallback.name)
            return _FallbackCompiled(self.fallback.compile(spec))

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill each row with the backend its matcher came from."""
        rows = [i for i, m in enumerate(matchers) if isinstance(m, _FallbackMatcher)]
        if not rows:
            self.primary.fill_bitmask(matchers, bitmask)
            return
        others = [i for i, m in enumerate(matchers) if not isinstance(m, _FallbackMatcher)]
        for backend, picked, unwrap in ((self.fallback, rows, True),
                                        (self.primary, others, False)):
            if not picked:
                continue
            part = torch.empty(len(picked), bitmask_words(self.vocab_size), dtype=torch.int32)
            backend.fill_bitmask([matchers[i].inner if unwrap else matchers[i]  # type: ignore[attr-defined]
                                  for i in picked], part)
            bitmask[picked] = part

    def close(self) -> None:
        """Stop the primary's worker (a running compile finishes in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
