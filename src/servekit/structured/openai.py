"""OpenAI request fields as guided-decoding constraints (no HTTP here: front ends call this)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.sched.params import GuidedDecoding, InvalidParameterError

__all__ = ["guided_from_response_format"]


def guided_from_response_format(response_format: Mapping[str, Any] | None) -> GuidedDecoding | None:
    """The constraint of an OpenAI ``response_format`` (None for ``text`` or no field).

    ``{"type": "json_object"}`` is any JSON object; ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": bool}}`` follows the schema (always enforced: a
    non-strict schema is enforced too, which OpenAI allows). Errors name the field, e.g.
    ``response_format.json_schema.schema``.
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
    if kind != "json_schema":
        raise InvalidParameterError(
            "response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
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
