"""A hypothesis strategy of JSON schemas over the subset servekit documents (docs/structured.md).

Objects with ``properties`` / ``required`` (nested up to two levels), ``enum``, arrays with
``minItems`` / ``maxItems``, ``anyOf``, strings with ``maxLength`` or a ``pattern``, integer and
number ranges, booleans, and ``$ref`` to ``$defs``. Every size is bounded so an output fits in a
few hundred tokens of the demo model's context.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_NAMES = st.sampled_from(["name", "age", "city", "tags", "score", "ok", "kind", "id"])

_bounded_leaf: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.integers(0, 12).map(lambda n: {"type": "string", "maxLength": n}),
    # anchored: JSON Schema patterns match anywhere in the string (llguidance follows that;
    # xgrammar anchors them), and an unanchored one would make jsonschema's check vacuous
    st.sampled_from([r"^[a-z]{1,6}$", r"^[A-Z][a-z]{0,4}$", r"^\d{2,3}-\d{2}$"]).map(
        lambda p: {"type": "string", "pattern": p}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "boolean"}),
    st.lists(st.sampled_from(["red", "green", "blue", "x y", 'q"uote']), min_size=1,
             max_size=4, unique=True).map(lambda v: {"enum": v}),
)
_leaf: st.SearchStrategy[dict[str, Any]] = st.one_of(
    _bounded_leaf, st.just({"type": "number", "minimum": 0, "maximum": 10}))


def _array(items: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(items, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})


def _object(values: st.SearchStrategy[dict[str, Any]],
            max_size: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], data: st.DataObject) -> dict[str, Any]:
        required = data.draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}

    return st.builds(build, st.dictionaries(_NAMES, values, max_size=max_size), st.data())


def _values(leaf: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        leaf,
        _array(leaf),
        st.lists(leaf, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs}),
        _object(leaf),
    )


def _with_ref(schema: dict[str, Any], leaf: dict[str, Any]) -> dict[str, Any]:
    props = dict(schema["properties"])
    props["ref"] = {"$ref": "#/$defs/leaf"}
    return {**schema, "properties": props, "required": [*schema["required"], "ref"],
            "$defs": {"leaf": leaf}}


def _schemas(leaf: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(_object(_values(leaf)), st.builds(_with_ref, _object(leaf), leaf))


json_schemas: st.SearchStrategy[dict[str, Any]] = _schemas(_leaf)

#: The same without unbounded numbers: a number's fraction may run on forever under a backend
#: that does not cap its digits (llguidance), so an output could never finish.
bounded_json_schemas: st.SearchStrategy[dict[str, Any]] = _schemas(_bounded_leaf)

#: A tool's parameters: an object of at most two bounded leaves (a number's digits are not
#: bounded), so the tools section and a forced call fit in the demo model's 256-token context.
tool_parameters: st.SearchStrategy[dict[str, Any]] = _object(_bounded_leaf, max_size=2)
