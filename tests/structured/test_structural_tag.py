"""Structural tags: free text whose tagged regions (begin, JSON, end) are constrained, on both
backends, checked token by token and through the engine on the demo model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.structured.llguidance_backend import LLGuidanceBackend
from servekit.structured.xgrammar_backend import XGrammarBackend
from tests.structured.conftest import make_engine
from tests.structured.strategies import json_schemas

ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"enum": ["Rome", "Oslo", "Lima"]}},
        "required": ["city"], "additionalProperties": False}
TAGS = [{"begin": "<tool=add>", "schema": ADD, "end": "</tool>"},
        {"begin": "<tool=city>", "schema": CITY, "end": "</tool>"}]
SCHEMAS = {"add": ADD, "city": CITY}
REGION = re.compile(r"<tool=(\w+)>(.*?)</tool>", re.S)
BACKENDS = [XGrammarBackend, LLGuidanceBackend]
_ENGINES: dict[tuple[Path, str], Any] = {}


def engine(path: Path, backend: str) -> Any:
    if (path, backend) not in _ENGINES:
        _ENGINES[path, backend] = make_engine(path, num_blocks=256, block_size=16,
                                              max_num_seqs=16, guided_backend=backend)
    return _ENGINES[path, backend]


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_dir))


def accepts(backend: Any, spec: GuidedDecoding, tokenizer: Any, text: str) -> bool:
    matcher = backend.compile(spec).new_matcher()
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return all(matcher.accept_token(t) for t in ids)


CASES = ['hello <tool=add>{"a": 1, "b": 2}</tool> bye', '<tool=city>{"city": "Rome"}</tool>',
         "just text", '<tool=add>{"a": 1, "b": 2}</tool> and <tool=city>{"city": "Oslo"}</tool>',
         'x <tool=add>{"a": 1}</tool>', 'x <tool=add>{"a": 1, "b": 200}</tool>',
         'x <tool=city>{"city": "Paris"}</tool>', "a <toolbox>", 'x <tool=sub>{"a": 1}</tool>']
#: (at_least_one, stop_after_first) -> which CASES are accepted (xgrammar's semantics)
EXPECTED = {(False, False): [1, 1, 1, 1, 0, 0, 0, 0, 0],
            (False, True): [0, 1, 1, 0, 0, 0, 0, 0, 0],
            (True, False): [0, 1, 0, 1, 0, 0, 0, 0, 0],
            (True, True): [0, 1, 0, 0, 0, 0, 0, 0, 0]}


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("flags", list(EXPECTED))
def test_both_backends_accept_exactly_the_tagged_language(
        tokenizer: Any, backend_cls: Any, flags: tuple[bool, bool]) -> None:
    backend = backend_cls(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    spec = GuidedDecoding.structural_tag(TAGS, ["<tool"], at_least_one=flags[0],
                                         stop_after_first=flags[1])
    got = [int(accepts(backend, spec, tokenizer, text)) for text in CASES]
    assert got == EXPECTED[flags]


def check_regions(text: str) -> int:
    """Validate every tagged region of ``text``; how many there were."""
    regions = REGION.findall(text)
    for name, body in regions:
        jsonschema.validate(json.loads(body), SCHEMAS[name])
    return len(regions)


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
def test_engine_outputs_have_valid_tagged_regions(demo_dir: Path, backend: str) -> None:
    eng = engine(demo_dir, backend)
    forced = GuidedDecoding.structural_tag(TAGS, ["<tool"], at_least_one=True)
    free = GuidedDecoding.structural_tag(TAGS, ["<tool"])
    params = [SamplingParams(max_tokens=120, temperature=t, seed=i, guided=g)
              for i, (t, g) in enumerate([(0.0, forced), (0.8, forced), (1.2, forced),
                                          (1.0, forced), (0.0, free), (1.0, free)])]
    outs = eng.generate(["ROMEO:", "JULIET:", "<", "x", "ROMEO:", "<tool"], params)
    for out, p in zip(outs, params, strict=True):
        assert out.finish_reason in ("stop", "length"), (out.finish_reason, out.error)
        n = check_regions(out.text)
        if p.guided is forced:
            assert out.text.startswith("<tool="), out.text
            assert n >= 1 or out.finish_reason == "length", out.text
    assert sum(check_regions(o.text) for o in outs[:4]) >= 3


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=json_schemas, temperature=st.sampled_from([0.0, 1.0]),
       backend=st.sampled_from(["xgrammar", "llguidance"]))
def test_generated_schemas_inside_a_tag_validate(demo_dir: Path, schema: dict[str, Any],
                                                 temperature: float, backend: str) -> None:
    spec = GuidedDecoding.structural_tag(
        [{"begin": "<json>", "schema": schema, "end": "</json>"}], ["<json>"],
        at_least_one=True, stop_after_first=True)
    eng = engine(demo_dir, backend)
    outs = eng.generate(["ROMEO:", "JULIET:"], [
        SamplingParams(max_tokens=160, temperature=temperature, seed=i, guided=spec)
        for i in range(2)])
    for out in outs:
        assert out.finish_reason in ("stop", "length"), (out.finish_reason, out.error)
        if out.finish_reason == "stop":  # the whole output is the one tag
            assert out.text.startswith("<json>") and out.text.endswith("</json>"), out.text
            jsonschema.validate(json.loads(out.text[len("<json>"):-len("</json>")]), schema)


@pytest.mark.parametrize(("tags", "triggers", "param"), [
    (TAGS, [], "guided.structural_tag.triggers"),
    ([], ["<tool"], "guided.structural_tag.tags"),
    ([{"begin": "<fn=a>", "schema": ADD, "end": "</fn>"}], ["<tool"],
     "guided.structural_tag.tags[0].begin"),
    ([{"begin": "<tool=a>", "schema": "x", "end": ""}], ["<tool"],
     "guided.structural_tag.tags[0].schema"),
    ([{"begin": "<tool=a>", "end": ""}], ["<tool"], "guided.structural_tag"),
])
def test_bad_structural_tags_name_the_field(tags: Any, triggers: Any, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        GuidedDecoding.structural_tag(tags, triggers)
    assert info.value.param == param


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda b: b.name)
def test_an_unusable_schema_is_an_error_naming_the_tag(tokenizer: Any, backend_cls: Any) -> None:
    backend = backend_cls(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    spec = GuidedDecoding.structural_tag(
        [TAGS[0], {"begin": "<tool=bad>", "schema": {"type": "wat"}, "end": "</tool>"}],
        ["<tool"])
    with pytest.raises(InvalidParameterError) as info:
        backend.compile(spec)
    assert info.value.param.startswith("guided.structural_tag")
