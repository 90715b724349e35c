"""The llguidance backend, and xgrammar falling back to it when a compile runs long."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.structured import GrammarCompiler, grammar_backend
from servekit.structured.backend import bitmask_words
from servekit.structured.fallback import FallbackBackend
from tests.structured.conftest import make_engine
from tests.structured.strategies import bounded_json_schemas

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "n"], "additionalProperties": False}

_ENGINES: dict[tuple[Path, str], Any] = {}


def _engine(path: Path, backend: str = "llguidance") -> Any:
    if (path, backend) not in _ENGINES:
        _ENGINES[path, backend] = make_engine(path, num_blocks=256, max_num_seqs=16,
                                              guided_backend=backend)
    return _ENGINES[path, backend]


def _valid(results: list[Any], schema: dict[str, Any]) -> int:
    stopped = 0
    for r in results:
        assert r.finish_reason in ("stop", "length"), (r.finish_reason, r.error)
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), schema)
            stopped += 1
    return stopped


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=bounded_json_schemas)
def test_llguidance_outputs_validate_against_generated_schemas(
        demo_dir: Path, schema: dict[str, Any]) -> None:
    engine = _engine(demo_dir)
    params = [SamplingParams(max_tokens=160, temperature=t, seed=i,
                             guided=GuidedDecoding.json_schema(schema))
              for i, t in enumerate((0.0, 0.8, 1.5))]
    assert _valid(engine.generate(["ROMEO:", "JULIET:", "{"], params), schema) >= 1


def test_llguidance_choice_regex_grammar_and_json_object(demo_dir: Path) -> None:
    engine = _engine(demo_dir)
    specs = [
        (GuidedDecoding.choice(["yes", "no", "héllo wörld"]),
         lambda t: t in ("yes", "no", "héllo wörld")),
        (GuidedDecoding.regex(r"[a-c]{2,5}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t)),
        (GuidedDecoding.grammar('root ::= "(" ("x" | "y")* ")"'),
         lambda t: re.fullmatch(r"\([xy]*\)", t)),
        (GuidedDecoding.json_object(), lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=7, guided=g) for g, _ in specs]
    results = engine.generate(["the fox"] * len(specs), params)
    for (_, ok), r in zip(specs, results, strict=True):
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "stop":
            assert ok(r.text), r.text
    assert [r.finish_reason for r in results[:2]] == ["stop", "stop"]  # these always fit


def test_both_backends_accept_each_others_greedy_outputs(demo_dir: Path) -> None:
    """The backends agree on the format (separators, whitespace): each one's matcher accepts
    every token of the other's output and ends where it ends."""
    guided = GuidedDecoding.json_schema(SCHEMA)
    params = SamplingParams(max_tokens=120, temperature=0.0, guided=guided)
    engines = {b: _engine(demo_dir, b) for b in ("xgrammar", "llguidance")}
    for producer, consumer in (("xgrammar", "llguidance"), ("llguidance", "xgrammar")):
        out = engines[producer].generate(["ROMEO:"], params)[0]
        assert out.finish_reason == "stop", out
        matcher = engines[consumer].grammars.compile(guided).new_matcher()
        for token in out.token_ids:
            assert matcher.accept_token(token), (producer, out.text)
        assert matcher.is_terminated()


def test_llguidance_rejects_a_token_without_moving_and_rolls_back(demo_dir: Path) -> None:
    engine = _engine(demo_dir)
    backend = engine.grammars.backend
    matcher = engine.grammars.compile(GuidedDecoding.json_object()).new_matcher()
    words = bitmask_words(engine.vocab_size)
    start = torch.empty(1, words, dtype=torch.int32)
    backend.fill_bitmask([matcher], start)
    ids = engine.tokenizer.encode('{"a": 1', add_special_tokens=False)
    for t in ids:
        assert matcher.accept_token(t)
    assert not matcher.accept_token(engine.tokenizer.encode("]", add_special_tokens=False)[0])
    assert matcher.accept_token(engine.tokenizer.encode("}", add_special_tokens=False)[0])
    matcher.rollback(len(ids) + 1)
    again = torch.empty(1, words, dtype=torch.int32)
    backend.fill_bitmask([matcher], again)
    assert torch.equal(start, again)


def test_llguidance_errors_name_the_field(demo_dir: Path) -> None:
    engine = _engine(demo_dir)
    with pytest.raises(InvalidParameterError) as info:
        engine.grammars.compile(GuidedDecoding.regex("(unclosed"))
    assert info.value.param == "guided.regex"
    with pytest.raises(InvalidParameterError) as info:
        engine.grammars.compile(GuidedDecoding.grammar("root ::= undefined_rule"))
    assert info.value.param == "guided.grammar"


class _Slow:
    """A backend whose compile first sleeps (a pathological schema), else the inner one."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.name, self.vocab_size = "slow-" + inner.name, inner.vocab_size

    def compile(self, spec: GuidedDecoding) -> Any:
        time.sleep(self.seconds)
        return self.inner.compile(spec)

    def fill_bitmask(self, matchers: Any, bitmask: torch.Tensor) -> None:
        self.inner.fill_bitmask(matchers, bitmask)


def test_a_slow_compile_falls_back_and_a_mixed_batch_is_masked_by_both(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_blocks=256, max_num_seqs=16)
    stops = engine.scheduler.eos_token_ids
    fast = grammar_backend("xgrammar", engine.tokenizer, engine.vocab_size, stops)
    fallback = grammar_backend("llguidance", engine.tokenizer, engine.vocab_size, stops)
    slow_schema = GuidedDecoding.json_schema(SCHEMA)
    quick_schema = GuidedDecoding.json_schema({"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False})

    class _SlowForOne(_Slow):
        def compile(self, spec: GuidedDecoding) -> Any:
            if spec == slow_schema:
                time.sleep(self.seconds)
            return self.inner.compile(spec)

    backend = FallbackBackend(_SlowForOne(fast, 1.0), fallback, after=0.2)
    engine.grammars = GrammarCompiler(backend)
    t0 = time.monotonic()
    engine.grammars.compile(slow_schema)
    assert time.monotonic() - t0 < 0.9 and backend.fallbacks == 1
    time.sleep(1.0)  # the primary compiles one at a time: let the slow one finish
    engine.grammars.compile(quick_schema)
    assert backend.fallbacks == 1  # the quick one came from xgrammar
    params = [SamplingParams(max_tokens=120, temperature=0.8, seed=i, guided=g)
              for i, g in enumerate([slow_schema, quick_schema] * 3)]
    results = engine.generate(["ROMEO:"] * 6, params)
    schemas = [SCHEMA, json.loads(quick_schema.value)] * 3
    for r, schema in zip(results, schemas, strict=True):
        assert r.finish_reason == "stop", (r.text, r.error)
        jsonschema.validate(json.loads(r.text), schema)
    # an invalid schema is an error from the primary, not a fallback
    with pytest.raises(InvalidParameterError):
        backend.compile(GuidedDecoding.json_schema({"type": "nonsense"}))
    assert backend.fallbacks == 1
    backend.close()


def test_engine_config_names_a_bad_backend_or_fallback_time() -> None:
    from servekit.engine.config import EngineConfig

    with pytest.raises(InvalidParameterError) as info:
        EngineConfig(guided_backend="outlines")
    assert info.value.param == "guided_backend"
    for bad in (0, -1.0, "2", True):
        with pytest.raises(InvalidParameterError) as info:
            EngineConfig(guided_fallback_after=bad)  # type: ignore[arg-type]
        assert info.value.param == "guided_fallback_after"
    assert EngineConfig(guided_fallback_after=None).guided_fallback_after is None
