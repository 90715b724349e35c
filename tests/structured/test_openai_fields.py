"""OpenAI ``response_format`` to guided decoding, with errors naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.openai import guided_from_response_format


def test_text_and_absent_are_unconstrained() -> None:
    assert guided_from_response_format(None) is None
    assert guided_from_response_format({"type": "text"}) is None


def test_json_object_and_json_schema() -> None:
    assert guided_from_response_format({"type": "json_object"}) == GuidedDecoding.json_object()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    g = guided_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    assert g is not None and g.kind == "json_schema" and json.loads(g.value) == schema


def test_structural_tag() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tags = [{"begin": "<f=a>", "schema": schema, "end": "</f>"}]
    g = guided_from_response_format({"type": "structural_tag", "structures": tags,
                                     "triggers": ["<f="], "at_least_one": True})
    assert g == GuidedDecoding.structural_tag(tags, ["<f="], at_least_one=True)


TAG = {"begin": "<f=a>", "schema": {}, "end": "</f>"}


@pytest.mark.parametrize(("body", "param"), [
    ({"type": "structural_tag", "triggers": ["<f"]}, "response_format.structures"),
    ({"type": "structural_tag", "structures": [TAG]}, "response_format.triggers"),
    ({"type": "structural_tag", "structures": [TAG, {**TAG, "begin": "<g>"}],
      "triggers": ["<f"]}, "response_format.structures[1].begin"),
    ({"type": "structural_tag", "structures": [{**TAG, "schema": 3}], "triggers": ["<f"]},
     "response_format.structures[0].schema"),
    ({"type": "structural_tag", "structures": [TAG], "triggers": ["<f"],
      "stop_after_first": "yes"}, "response_format.stop_after_first"),
    ({"type": "xml"}, "response_format.type"),
    ("json", "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}},
     "response_format.json_schema.strict"),
])
def test_bad_response_format_names_the_field(body: Any, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        guided_from_response_format(body)
    assert info.value.param == param
