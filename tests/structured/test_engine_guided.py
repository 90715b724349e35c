"""Guided decoding through the engine: every output that finishes with ``stop`` is valid."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.structured import GrammarCompiler
from tests.structured.conftest import make_engine
from tests.structured.strategies import json_schemas

_ENGINES: dict[tuple[Path, int, int], Any] = {}


def _engine(path: Path, num_blocks: int = 256, chunk: int = 2048) -> Any:
    key = (path, num_blocks, chunk)
    if key not in _ENGINES:
        _ENGINES[key] = make_engine(path, num_blocks=num_blocks, block_size=16,
                                    max_num_batched_tokens=chunk, max_num_seqs=16)
    return _ENGINES[key]


def _check_outputs(results: list[Any], schema: dict[str, Any]) -> Counter[str]:
    reasons: Counter[str] = Counter()
    for r in results:
        reasons[r.finish_reason] += 1
        assert r.finish_reason in ("stop", "length"), (r.finish_reason, r.error)
        if r.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(r.text), schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                raise AssertionError(f"{r.text!r} {r.token_ids} invalid for {schema}") from exc
    return reasons


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=json_schemas, temperature=st.sampled_from([0.0, 0.8, 1.5]))
def test_demo_model_outputs_validate_against_generated_schemas(
        demo_dir: Path, schema: dict[str, Any], temperature: float) -> None:
    engine = _engine(demo_dir)
    params = [SamplingParams(max_tokens=160, temperature=temperature, seed=i,
                             guided=GuidedDecoding.json_schema(schema)) for i in range(3)]
    reasons = _check_outputs(engine.generate(["ROMEO:", "JULIET:", "{"], params), schema)
    assert reasons["stop"] >= 1, reasons  # length finishes stay rare


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=json_schemas)
def test_tiny_model_under_preemption_and_chunked_prefill(
        tiny_dir: Path, schema: dict[str, Any]) -> None:
    # distinct 63-token prompts in 12 blocks of 16: three fit, and an output past one token
    # needs a fifth block, so long outputs preempt (a deterministic case is asserted in
    # test_preempted_output_matches_unpreempted_greedy); 32-token chunks split every prefill
    engine = _engine(tiny_dir, num_blocks=12, chunk=32)
    text = "the quick brown fox jumps over the lazy dog. " * 4
    prompts = [engine.encode(f"{i}{i} {text}")[:63] for i in range(8)]
    params = [SamplingParams(max_tokens=120, temperature=0.0 if i % 2 else 1.0, seed=i,
                             guided=GuidedDecoding.json_schema(schema)) for i in range(8)]
    reasons = _check_outputs(engine.generate(prompts, params), schema)
    assert sum(reasons.values()) == 8
    assert engine.kv.num_free_blocks == engine.runner.num_blocks  # nothing leaked


def test_preempted_output_matches_unpreempted_greedy(tiny_dir: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20},
                                               "b": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}},
              "required": ["a", "b"], "additionalProperties": False}
    guided = GuidedDecoding.json_schema(schema)
    engine = _engine(tiny_dir)
    prompt = engine.encode("ROMEO: But soft, what light through yonder window breaks? " * 3)[:63]
    params = SamplingParams(max_tokens=100, temperature=0.0, guided=guided)
    alone = engine.generate([prompt], params)[0]
    tight = _engine(tiny_dir, num_blocks=12, chunk=32)
    before = tight.scheduler.num_preemptions
    crowd = tight.generate([prompt] * 6, params)
    assert tight.scheduler.num_preemptions > before
    assert all(r.token_ids == alone.token_ids for r in crowd)  # matcher state survived recompute


def test_choice_regex_grammar_and_json_object(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    specs = [
        (GuidedDecoding.choice(["yes", "no", "héllo wörld"]), lambda t: t in ("yes", "no", "héllo wörld")),
        (GuidedDecoding.regex(r"[a-c]{2,5}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t)),
        (GuidedDecoding.grammar('root ::= "(" ("x" | "y")* ")"'), lambda t: re.fullmatch(r"\([xy]*\)", t)),
        (GuidedDecoding.json_object(), lambda t: isinstance(json.loads(t), dict)),
    ]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(max_tokens=60, temperature=temperature, seed=7, guided=g)
                  for g, _ in specs]
        for (_, ok), r in zip(specs, engine.generate(["the fox"] * len(specs), params), strict=True):
            if r.finish_reason == "stop":
                assert ok(r.text), r.text
            else:
                assert r.finish_reason == "length"
    # the choice and the regex always fit in 60 tokens
    results = engine.generate(["a"] * 2, [SamplingParams(max_tokens=60, guided=g) for g, _ in specs[:2]])
    assert [r.finish_reason for r in results] == ["stop", "stop"]


def test_length_finish_keeps_the_partial_output(demo_dir: Path) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 40}},
              "required": ["s"]}
    r = _engine(demo_dir).generate(["ROMEO:"], SamplingParams(
        max_tokens=5, guided=GuidedDecoding.json_schema(schema)))[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    assert r.text.startswith('{"s')


def test_invalid_schema_names_the_field(demo_dir: Path) -> None:
    engine = _engine(demo_dir)
    bad = GuidedDecoding.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(InvalidParameterError) as info:
        engine.grammars.compile(bad)
    assert info.value.param == "guided.json_schema"
    # once the error is cached, add_request fails at once, naming the field
    with pytest.raises(InvalidParameterError, match=r"guided\.json_schema"):
        engine.add_request("ROMEO:", SamplingParams(guided=bad))
    assert not engine.has_unfinished_requests()


def test_compile_error_in_the_worker_fails_only_that_request(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_blocks=64)
    # a slowed compile is still running when add_request returns (a fast one could already
    # have failed there, which add_request reports by raising: tested above)
    engine.grammars = GrammarCompiler(_SlowBackend(engine.grammars.backend, 0.2))
    bad = GuidedDecoding.regex("(unclosed")
    good = SamplingParams(max_tokens=4, temperature=0.0)
    results = engine.generate(["ROMEO:", "JULIET:"], [SamplingParams(guided=bad), good])
    assert results[0].finish_reason == "error" and "guided.regex" in (results[0].error or "")
    assert results[1].finish_reason == "length"
    assert engine.kv.num_free_blocks == engine.runner.num_blocks


class _SlowBackend:
    """Wraps the real backend and delays compiles (a pathological schema)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.vocab_size = "slow", inner.vocab_size

    def compile(self, spec: GuidedDecoding) -> Any:
        time.sleep(self.delay)
        return self.inner.compile(spec)

    def fill_bitmask(self, matchers: Any, bitmask: Any) -> None:
        self.inner.fill_bitmask(matchers, bitmask)


def test_compile_time_limit_and_abort_while_waiting(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_blocks=64)
    engine.grammars = GrammarCompiler(_SlowBackend(engine.grammars.backend, 0.5), timeout=0.1)
    rid = engine.add_request("ROMEO:", SamplingParams(guided=GuidedDecoding.regex("[ab]+x")))
    assert engine.kv.num_free_blocks == engine.runner.num_blocks  # waits holding no blocks
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.finish_reason for o in outputs] == ["error"]
    assert "longer than" in (outputs[0].error or "") and outputs[0].request_id == rid
    # an abort while the grammar compiles ends the request at once
    rid2 = engine.add_request("ROMEO:", SamplingParams(guided=GuidedDecoding.regex("[cd]+x")))
    final = engine.abort(rid2)
    assert final is not None and final.finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    engine.grammars.close()


def test_compiles_are_cached_by_spec(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_blocks=64)
    spec = GuidedDecoding.json_schema({"type": "object", "properties": {"k": {"type": "boolean"}}})
    first: Future[Any] = engine.grammars.submit(spec)
    first.result()
    again = GuidedDecoding.json_schema('{"type": "object", "properties": {"k": {"type": "boolean"}}}')
    assert engine.grammars.submit(again) is first
    assert engine.grammars.compiles == 1


def test_matcher_rollback_restores_the_mask(demo_dir: Path) -> None:
    import torch

    engine = _engine(demo_dir)
    backend = engine.grammars.backend
    matcher = engine.grammars.compile(GuidedDecoding.json_object()).new_matcher()
    tok = engine.tokenizer
    words = (engine.vocab_size + 31) // 32
    start = torch.empty(1, words, dtype=torch.int32)
    backend.fill_bitmask([matcher], start)
    ids = tok.encode('{"a": 1', add_special_tokens=False)
    for t in ids:
        assert matcher.accept_token(t)
    assert not matcher.accept_token(tok.encode("]", add_special_tokens=False)[0])
    matcher.rollback(len(ids))
    again = torch.empty(1, words, dtype=torch.int32)
    backend.fill_bitmask([matcher], again)
    assert torch.equal(start, again)
    assert not matcher.is_terminated()


def test_sampling_params_reject_conflicts() -> None:
    guided = GuidedDecoding.json_object()
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        SamplingParams(guided=guided, ignore_eos=True)
    with pytest.raises(InvalidParameterError, match="min_tokens"):
        SamplingParams(guided=guided, min_tokens=2, max_tokens=4)
    with pytest.raises(InvalidParameterError, match=r"guided\.choice"):
        GuidedDecoding.choice([])
    with pytest.raises(InvalidParameterError, match=r"guided\.json_schema"):
        GuidedDecoding.json_schema("{not json")
    with pytest.raises(InvalidParameterError, match=r"guided\.json_schema"):
        GuidedDecoding.json_schema("[1, 2]")
    with pytest.raises(InvalidParameterError, match="guided"):
        GuidedDecoding("xml", "<a/>")
