"""Structured outputs in the SDK: ``response_format`` from a pydantic model or a JSON schema, and
the typed result of :meth:`Client.parse <servekit.client.http.Client.parse>`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from servekit.client.errors import ClientError
from servekit.client.types import ChatCompletion

__all__ = ["ParseError", "parse_message", "response_format_for"]


class ParseError(ClientError, ValueError):
    """The model's answer is not valid for the requested format (e.g. cut by ``max_tokens``)."""


def response_format_for(schema: Any, *, name: str | None = None) -> dict[str, Any]:
    """The ``response_format`` body of a pydantic model class or a JSON schema dict (strict)."""
    if isinstance(schema, Mapping):
        return {"type": "json_schema", "json_schema": {
            "name": name or "response", "schema": dict(schema), "strict": True}}
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return {"type": "json_schema", "json_schema": {
            "name": name or schema.__name__, "schema": schema.model_json_schema(), "strict": True}}
    raise TypeError("schema must be a pydantic model class or a JSON schema dict")


def parse_message(completion: ChatCompletion, schema: Any) -> Any:
    """The first choice's content as a ``schema`` instance (pydantic) or a parsed JSON value
    (validated against a dict ``schema`` with ``jsonschema`` when it is installed)."""
    choice = completion.choices[0]
    content = choice.message.content or ""
    if choice.finish_reason != "stop":
        raise ParseError(f"the answer ended with {choice.finish_reason!r}, not 'stop': "
                         f"{content[:200]!r}")
    if isinstance(schema, type) and hasattr(schema, "model_validate_json"):
        try:
            return schema.model_validate_json(content)
        except ValueError as exc:
            raise ParseError(f"the answer does not validate: {exc}") from exc
    try:
        value = json.loads(content)
    except ValueError as exc:
        raise ParseError(f"the answer is not JSON: {exc}") from exc
    if isinstance(schema, Mapping):
        _validate(value, schema)
    return value


def _validate(value: Any, schema: Mapping[str, Any]) -> None:
    """Check ``value`` against ``schema`` with ``jsonschema`` when it is installed (the server
    enforces the schema by grammar; this catches a server that does not)."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is optional on the client
        return
    try:
        jsonschema.validate(value, dict(schema))
    except jsonschema.ValidationError as exc:
        raise ParseError(f"the answer does not validate: {exc.message}") from exc
