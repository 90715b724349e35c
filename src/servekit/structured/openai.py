"""OpenAI request fields as guided-decoding constraints (no HTTP here: front ends call this)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.sched.params import GuidedDecoding, InvalidParameterError

__all__ = ["guided_from_response_format", "response_format_param"]


def guided_from_response_format(response_format: Mapping[str, Any] | None) -> GuidedDecoding | None:
    """The constraint of an OpenAI ``response_format`` (None for ``text`` or no field).

    ``{"type": "json_object"}`` is any JSON object; ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": bool}}`` follows the schema (always enforced: a
    non-strict schema is enforced too, which OpenAI allows); ``{"type": "structural_tag",
    "structures": [{"begin", "schema", "end"}], "triggers": [...]}`` (vLLM's and SGLang's
    shape, plus servekit's optional ``at_least_one`` and ``stop_after_first``) is free text
    whose tagged regions follow their schemas (:meth:`GuidedDecoding.structural_tag`). Errors
    name the field, e.g. ``response_format.json_schema.schema``.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidParameterError("response_format", "must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding.json_object()
    if kind == "structural_tag":
        return _structural_tag(response_format)
    if kind != "json_schema":
        raise InvalidParameterError(
            "response_format.type",
            f"must be text, json_object, json_schema or structural_tag, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParameterError("response_format.json_schema", "must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidParameterError("response_format.json_schema.name",
                                    "must be a non-empty string")
    if not isinstance(spec.get("strict", False), bool):
        raise InvalidParameterError("response_format.json_schema.strict", "must be a boolean")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, Mapping):
        raise InvalidParameterError("response_format.json_schema.schema",
                                    "must be a JSON schema object")
    try:
        return GuidedDecoding.json_schema(schema)
    except InvalidParameterError as exc:
        raise InvalidParameterError("response_format.json_schema.schema",
                                    str(exc).split(": ", 1)[-1]) from exc


def _structural_tag(response_format: Mapping[str, Any]) -> GuidedDecoding:
    structures = response_format.get("structures")
    if not isinstance(structures, list):
        raise InvalidParameterError("response_format.structures", "must be a list")
    try:
        return GuidedDecoding.structural_tag(
            structures, response_format.get("triggers") or [],
            at_least_one=response_format.get("at_least_one", False),
            stop_after_first=response_format.get("stop_after_first", False))
    except InvalidParameterError as exc:
        raise InvalidParameterError(response_format_param(exc.param),
                                    str(exc).split(": ", 1)[-1]) from exc


def response_format_param(param: str) -> str:
    """The ``response_format`` field a ``guided.structural_tag...`` error is about (the API
    calls the tags ``structures``); other names unchanged."""
    if param.startswith("guided.structural_tag.tags"):
        return "response_format.structures" + param[len("guided.structural_tag.tags"):]
    if param.startswith("guided.structural_tag"):
        return "response_format" + param[len("guided.structural_tag"):]
    return param
