"""``/openapi.json`` as the server really behaves, generated for the served model.

FastAPI's document is the starting point; this module makes it true: no 422 (validation errors
are 400s), every error status a route can answer with its body schema (OpenAI's error object, or
``google.rpc.Status`` on the REST mapping of the gRPC API), ``text/event-stream`` and NDJSON for
streams, ``text/plain`` for ``/metrics``, request schemas for ``/v1/generate`` (from the
.proto), and the bounds the server enforces that depend on the model: the served model names,
token ids within the vocabulary, prompt and ``max_tokens`` within the context, plus the
cross-field rules (``top_logprobs`` requires ``logprobs``).
"""

from __future__ import annotations

import copy
from typing import Any

from servekit.server.bounds import max_prompt_chars
from servekit.server.service import GenerationService

__all__ = ["openapi_document"]

_OPENAI_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_STATUS = {"$ref": "#/components/schemas/Status"}
_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "null"]}}}},
    },
    "Status": {  # google.rpc.Status in the proto3 JSON mapping
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                       "details": {"type": "array", "items": {"type": "object"}}},
    },
    "Completion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                       "created": {"type": "integer"}, "model": {"type": "string"},
                       "choices": {"type": "array", "items": {"type": "object"}},
                       "usage": {"type": ["object", "null"]}},
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}},
    },
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string"}}},
    "Readiness": {"type": "object", "required": ["ready", "phase", "in_flight"],
                  "properties": {"ready": {"type": "boolean"}, "phase": {"type": "string"},
                                 "in_flight": {"type": "integer"}}},
}
#: One server-sent event: ``data`` is a chunk's JSON, an error's JSON, or ``[DONE]``.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_WHY = {400: "The request is invalid (the error names the field).",
        401: "No API key, or an unknown one.",
        404: "The model is not served here.",
        413: "The request body is over the server's limit.",
        429: "Rate limited (retry-after and x-ratelimit-* headers).",
        503: "Overloaded, draining, starting, or the rate-limit store is down (retry-after)."}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(statuses: tuple[int, ...], schema: dict[str, Any],
            openai_statuses: tuple[int, ...] = ()) -> dict[str, Any]:
    return {str(s): {"description": _WHY[s],
                     "content": _json(_OPENAI_ERROR if s in openai_statuses else schema)}
            for s in statuses}


def openapi_document(base: dict[str, Any], service: GenerationService) -> dict[str, Any]:
    """``base`` (FastAPI's document) made true for ``service`` and its engine."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(_SCHEMAS))
    paths = doc["paths"]
    post = (400, 401, 404, 413, 429, 503)
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path in paths:
            paths[path]["post"]["responses"] = {
                "200": {"description": "The completion; a stream of events when `stream`.",
                        "content": {**_json({"$ref": "#/components/schemas/Completion"}),
                                    "text/event-stream": {"schema": _SSE_EVENT}}},
                **_errors(post, _OPENAI_ERROR)}
    if "/v1/models" in paths:
        paths["/v1/models"]["get"]["responses"] = {
            "200": {"description": "The served models.",
                    "content": _json({"$ref": "#/components/schemas/ModelList"})},
            **_errors((401,), _OPENAI_ERROR)}
    for path, ref in (("/health", "Health"), ("/ready", "Readiness")):
        if path in paths:
            body = _json({"$ref": f"#/components/schemas/{ref}"})
            paths[path]["get"]["responses"] = {
                "200": {"description": "Live." if ref == "Health" else "Accepting requests.",
                        "content": body},
                "503": {"description": "Failed." if ref == "Health"
                        else "Starting, draining or failed.", "content": body}}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {"200": {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}
    engine = service.engine
    names = list(service.model_names)
    if engine is not None:
        _bound_openai(schemas, names, len(engine.tokenizer), engine.max_model_len,
                      service.token_chars)
    for path, streaming in (("/v1/generate", False), ("/v1/generate:stream", True)):
        if path in paths:
            _generate(paths[path]["post"], schemas, streaming, post)
            if engine is not None:
                _bound_generate(schemas, names, len(engine.tokenizer), engine.max_model_len)
    return doc


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null member of a pydantic ``X | None`` property (the property itself if none)."""
    for member in prop.get("anyOf", ()):
        if member.get("type") != "null":
            return dict(member)
    return prop


def _bound_openai(schemas: dict[str, Any], names: list[str], vocab: int, max_model_len: int,
                  token_chars: int | None) -> None:
    ids = {"type": "array", "minItems": 1, "maxItems": max_model_len - 1,
           "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
    text: dict[str, Any] = {"type": "string", "minLength": 1}
    if token_chars is not None:
        text["maxLength"] = max_prompt_chars(max_model_len, token_chars)
    max_tokens = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_model_len - 1},
                            {"type": "null"}]}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        if names:
            props["model"] = {"type": "string", "enum": names}
        props["max_tokens"] = {**max_tokens, "default": props["max_tokens"].get("default")}
    completion = schemas["CompletionRequest"]["properties"]
    completion["prompt"] = {"anyOf": [text, {"type": "array", "minItems": 1, "items": text},
                                      ids, {"type": "array", "minItems": 1, "items": ids}]}
    chat = schemas["ChatCompletionRequest"]
    chat["properties"]["max_completion_tokens"] = max_tokens
    # top_logprobs requires logprobs: true (else 400)
    chat["if"] = {"required": ["top_logprobs"],
                  "properties": {"top_logprobs": {"type": "integer"}}}
    chat["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}


_SCALARS = {1: "number", 2: "number", 3: "integer", 4: "integer", 5: "integer", 6: "integer",
            7: "integer", 8: "boolean", 9: "string", 12: "string", 13: "integer",
            15: "integer", 16: "integer", 17: "integer", 18: "integer"}
_INT64 = {3, 4, 6, 16, 18}  # written as strings or numbers in the proto3 JSON mapping


def _message_schema(descriptor: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema of a protobuf message in the proto3 JSON mapping (lowerCamelCase names)."""
    props: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            name = field.message_type.name
            if name not in schemas:
                schemas[name] = {}  # placeholder against recursion
                schemas[name] = _message_schema(field.message_type, schemas)
            item: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
        else:
            kind = _SCALARS.get(field.type, "string")
            item = {"type": [kind, "string"]} if field.type in _INT64 else {"type": kind}
        props[field.json_name] = {"type": "array", "items": item} if field.is_repeated else item
    return {"type": "object", "properties": props, "additionalProperties": False}


def _generate(op: dict[str, Any], schemas: dict[str, Any], streaming: bool,
              statuses: tuple[int, ...]) -> None:
    from servekit.protocol.grpc_gen import servekit_pb2 as pb

    if "GenerateRequest" not in schemas:
        schemas["GenerateRequest"] = _message_schema(pb.GenerateRequest.DESCRIPTOR, schemas)
    op["requestBody"] = {"required": True,
                         "content": _json({"$ref": "#/components/schemas/GenerateRequest"})}
    ok = ({"application/x-ndjson": {"schema": {"type": "string"}}} if streaming
          else _json({"type": "object"}))
    # the auth and body-limit layers in front of every route answer in OpenAI's shape
    op["responses"] = {"200": {"description": "One GenerateChunk JSON per line." if streaming
                               else "The GenerateResponse.", "content": ok},
                       **_errors(statuses, _STATUS, openai_statuses=(401, 413))}


def _bound_generate(schemas: dict[str, Any], names: list[str], vocab: int,
                    max_model_len: int) -> None:
    props = schemas["GenerateRequest"]["properties"]
    if names:
        props["model"] = {"type": "string", "enum": names}
    props["prompt"] = {"type": "string", "minLength": 1}
    props["maxTokens"] = {"type": "integer", "minimum": 1, "maximum": max_model_len - 1}
    props["n"] = {"type": "integer", "minimum": 0, "maximum": 16}
    props["stop"] = {"type": "array", "maxItems": 16, "items": {"type": "string", "minLength": 1}}
    props["logprobs"] = {"type": "integer", "minimum": 0, "maximum": 20}
    schemas["TokenIds"]["properties"]["ids"] = {
        "type": "array", "minItems": 1, "maxItems": max_model_len - 1,
        "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
