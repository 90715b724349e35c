"""The llguidance backend: no compile step (grammars are built lazily as tokens arrive), so a
schema that takes xgrammar long to compile is ready at once; masks filled in parallel."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from servekit._optional import require
from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.backend import GrammarMatcher

__all__ = ["LLGuidanceBackend", "structural_tag_lark"]

# xgrammar's JSON is compact (no whitespace between tokens); llguidance is told the same, so
# both backends produce the same outputs for the same tokens
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class _Matcher:
    __slots__ = ("inner", "stops")

    def __init__(self, inner: Any, stops: frozenset[int]) -> None:
        self.inner, self.stops = inner, stops

    def accept_token(self, token_id: int) -> bool:
        inner = self.inner
        if inner.is_stopped():  # complete, nothing may follow: only a stop token ends it
            return token_id in self.stops
        # try_consume leaves the state as it was when the token is refused; a stop token at an
        # accepting point is "consumed" as 0 tokens that stop the matcher
        return inner.try_consume_tokens([token_id]) == 1 or bool(inner.is_stopped())

    def rollback(self, num_tokens: int) -> None:
        self.inner.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.inner.is_stopped())


class _Compiled:
    __slots__ = ("_grammar", "_llg", "_stops", "_tokenizer")

    def __init__(self, llg: Any, tokenizer: Any, grammar: str, stops: frozenset[int]) -> None:
        self._llg, self._tokenizer, self._grammar = llg, tokenizer, grammar
        self._stops = stops

    def new_matcher(self) -> GrammarMatcher:
        return _Matcher(self._llg.LLMatcher(self._tokenizer, self._grammar, log_level=0),
                        self._stops)


class LLGuidanceBackend:
    """llguidance for a Hugging Face ``tokenizer`` whose model emits ``vocab_size`` logits.

    ``stop_token_ids`` end a request: the grammar allows them exactly where the output is
    complete. ``compile`` only translates and validates the constraint (milliseconds); the
    grammar's automaton is built token by token as the matcher runs.
    """

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                 *, max_threads: int = 2) -> None:
        llg = require("llguidance", "structured")
        import llguidance.hf
        import llguidance.torch

        self._llg = llg
        self._fill = llguidance.torch.fill_next_token_bitmask_par
        self.vocab_size = vocab_size
        stops = sorted(set(stop_token_ids))
        self._stops = frozenset(stops)
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=stops or None)
        self._executor = llg.LLExecutor(max_threads)

    def compile(self, spec: GuidedDecoding) -> _Compiled:
        """Translate and validate ``spec``; errors name ``guided.<kind>``."""
        llg, matcher = self._llg, self._llg.LLMatcher
        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
                grammar = matcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = matcher.grammar_from_regex(spec.value)
            elif spec.kind == "grammar":
                grammar = llg.grammar_from("grammar", spec.value)
            elif spec.kind == "structural_tag":
                grammar = llg.grammar_from("lark", structural_tag_lark(spec))
            else:  # choice: a JSON list of strings
                grammar = llg.grammar_from("choice", json.dumps(json.loads(spec.value)))
        except Exception as exc:  # malformed input: ValueError and friends
            raise InvalidParameterError(f"guided.{spec.kind}", _first_line(exc)) from exc
        error = matcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise InvalidParameterError(f"guided.{spec.kind}", _first_line(error))
        return _Compiled(llg, self._tokenizer, grammar, self._stops)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask[i]`` for ``matchers[i]`` (llguidance's executor, in parallel)."""
        self._fill(self._executor,
                   [(m.inner, i) for i, m in enumerate(matchers)],  # type: ignore[attr-defined]
                   bitmask)


def structural_tag_lark(spec: GuidedDecoding) -> str:
    """The Lark grammar of a ``structural_tag`` constraint, as llguidance's
    ``StructTag.to_grammar`` writes it (free text up to a trigger, a lazy lexeme, then the
    tag), plus xgrammar's ``at_least_one`` and ``stop_after_first``. Triggers are text, not
    special tokens; each tag's JSON uses the same separators as the other JSON constraints."""
    value = spec.tag_spec()
    lines = ["%llguidance {}", "tag_end: TAG_TEXT", r"TAG_TEXT: /(.|\n)*/"]
    tagged, first = [], []
    for i, tag in enumerate(value["structures"]):
        schema = tag["schema"]
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": _JSON_OPTIONS}
        body = f"%json {json.dumps(schema)}" + (f" {json.dumps(tag['end'])}" if tag["end"] else "")
        rest = tag["begin"][len(tag["trigger"]):]
        lines.append(f"tag_{i}_trig[lazy]: TAG_TEXT {json.dumps(tag['trigger'])}")
        lines.append(f"tag_{i}: tag_{i}_trig {json.dumps(rest) if rest else ''} {body}")
        lines.append(f"first_{i}: {json.dumps(tag['begin'])} {body}")
        tagged.append(f"tag_{i}")
        first.append(f"first_{i}")
    tags, firsts = " | ".join(tagged), " | ".join(first)
    once = value["stop_after_first"]
    if value["at_least_one"]:
        start = f"({firsts})" if once else f"({firsts}) ({tags})* tag_end"
    else:
        start = f"({tags}) | tag_end" if once else f"({tags})* tag_end"
    lines.insert(1, f"start: {start}")
    return "\n".join(lines) + "\n"


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
