"""The xgrammar backend: compiled grammars, per-request matchers, multi-threaded batch fill."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from servekit._optional import require
from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.backend import GrammarMatcher

__all__ = ["XGrammarBackend"]


class _Matcher:
    __slots__ = ("inner", "json")

    def __init__(self, inner: Any, json: bool) -> None:
        self.inner = inner
        self.json = json

    def accept_token(self, token_id: int) -> bool:
        return bool(self.inner.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self.inner.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.inner.is_terminated())


class _Compiled:
    __slots__ = ("_grammar", "_json", "_xgr")

    def __init__(self, xgr: Any, grammar: Any, json: bool) -> None:
        self._xgr = xgr
        self._grammar = grammar
        self._json = json

    def new_matcher(self) -> GrammarMatcher:
        return _Matcher(self._xgr.GrammarMatcher(self._grammar), self._json)


class XGrammarBackend:
    """xgrammar for a Hugging Face ``tokenizer`` whose model emits ``vocab_size`` logits.

    ``stop_token_ids`` are the tokens that end a request (the engine's eos ids): the grammar
    allows them exactly where the output is complete.
    """

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                 *, max_threads: int = 2) -> None:
        xgr = require("xgrammar", "structured")
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(set(stop_token_ids)))
        # xgrammar's own cache is off: servekit caches compiled grammars by spec, with limits
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)
        self._json_allowed = _json_safe_tokens(info.decoded_vocab, vocab_size,
                                               set(info.special_token_ids) | set(stop_token_ids))

    def compile(self, spec: GuidedDecoding) -> _Compiled:
        """Compile ``spec`` (blocking; the engine runs this in its grammar worker)."""
        c = self._compiler
        try:
            if spec.kind == "json_schema":
                grammar = c.compile_json_schema(spec.value, any_whitespace=False)
            elif spec.kind == "json_object":  # the builtin JSON grammar allows any value
                grammar = c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.kind == "regex":
                grammar = c.compile_regex(spec.value)
            elif spec.kind == "grammar":
                grammar = c.compile_grammar(spec.value)
            elif spec.kind == "structural_tag":
                grammar = c.compile_structural_tag(json.dumps(self._structural_tag(spec)))
            else:  # choice
                alternatives = " | ".join(json.dumps(s, ensure_ascii=False)
                                          for s in json.loads(spec.value))
                grammar = c.compile_grammar(f"root ::= {alternatives}")
        except InvalidParameterError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError subtypes
            raise InvalidParameterError(f"guided.{spec.kind}", _first_line(exc)) from exc
        return _Compiled(self._xgr, grammar, spec.kind in ("json_schema", "json_object"))

    def _structural_tag(self, spec: GuidedDecoding) -> dict[str, Any]:
        """xgrammar's ``triggered_tags`` structural tag; each tag's JSON is compact (the
        grammar of ``compile_json_schema(any_whitespace=False)``), as llguidance's."""
        value = spec.tag_spec()
        tags = []
        for i, tag in enumerate(value["structures"]):
            try:
                body = self._xgr.Grammar.from_json_schema(json.dumps(tag["schema"]),
                                                          any_whitespace=False)
            except Exception as exc:
                raise InvalidParameterError(f"guided.structural_tag.tags[{i}].schema",
                                            _first_line(exc)) from exc
            tags.append({"type": "tag", "begin": tag["begin"], "end": tag["end"],
                         "content": {"type": "grammar", "grammar": str(body)}})
        return {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": value["triggers"], "tags": tags,
            "at_least_one": value["at_least_one"],
            "stop_after_first": value["stop_after_first"]}}

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask[i]`` for ``matchers[i]`` (xgrammar's matchers, in parallel)."""
        inner = [m.inner for m in matchers]  # type: ignore[attr-defined]
        if len(inner) == 1:
            inner[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self._batch.batch_fill_next_token_bitmask(inner, bitmask)
        json_rows = [i for i, m in enumerate(matchers) if m.json]  # type: ignore[attr-defined]
        if json_rows:
            bitmask[json_rows] &= self._json_allowed


def _json_safe_tokens(vocab: Sequence[bytes], vocab_size: int, keep: set[int]) -> torch.Tensor:
    """Allowed-bits row of the tokens a JSON output may contain.

    xgrammar's JSON-schema strings admit raw control bytes and UTF-16 surrogates encoded as
    UTF-8 (``ED A0..BF``), which no JSON parser accepts. The output never needs them (control
    characters are written escaped, whitespace is fixed), so tokens that carry one are masked:
    a control byte, ``ED A0..BF`` inside the token, or a trailing ``ED`` (a later token could
    complete a surrogate). The cost: characters U+D000..U+D7FF cannot be split across tokens.
    """
    words = (vocab_size + 31) // 32
    bits = [0] * (words * 32)
    for t in range(vocab_size):
        b = vocab[t] if t < len(vocab) else b""
        bad = t not in keep and (
            any(c < 0x20 for c in b) or b.endswith(b"\xed")
            or any(b[i] == 0xED and 0xA0 <= b[i + 1] <= 0xBF for i in range(len(b) - 1)))
        bits[t] = 0 if bad else 1
    packed = [sum(bits[w * 32 + k] << k for k in range(32)) for w in range(words)]
    row = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in packed], dtype=torch.int32)
    return row


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
