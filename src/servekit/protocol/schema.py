"""OpenAI request bodies (pydantic, strict JSON types) and the 400 for an invalid one.

Validation is strict the way OpenAI's API is: ``"max_tokens": "5"`` is a type error, not 5.
Unknown fields are ignored. What a server does with a valid body (which fields it can honour,
the SamplingParams it builds) is the server's business: :mod:`servekit.server.params`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from servekit.protocol.errors import InvalidRequestError

__all__ = [
    "ChatCompletionRequest",
    "ChatMessageParam",
    "CompletionRequest",
    "FunctionCallParam",
    "ResumeExtension",
    "StreamOptions",
    "TextPart",
    "ToolCallParam",
    "bad_request_from_validation",
    "check_text",
]

_STRICT = ConfigDict(strict=True, extra="ignore")
_StopString = Annotated[str, Field(min_length=1)]
#: One stop string or at most 16 (the engine never emits them).
Stop = _StopString | Annotated[list[_StopString], Field(max_length=16)] | None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the whole request's usage."""

    model_config = _STRICT
    include_usage: bool = False


class ResumeChoice(BaseModel):
    """One choice of a resumed stream of several: the output token ids it already streamed,
    and its finish reason if it had finished (it is not continued)."""

    model_config = _STRICT
    output_token_ids: list[Annotated[int, Field(ge=0)]]
    finish_reason: str | None = Field(default=None, min_length=1, max_length=32)


class ResumeExtension(BaseModel):
    """``servekit_resume``: continue a stream another replica cut short (sent only by a trusted
    gateway): the output token ids it already streamed (``output_token_ids`` for one choice,
    ``choices`` in index order for several), and the stream's id and creation time so the
    continued chunks carry the same ones."""

    model_config = _STRICT
    output_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    choices: list[ResumeChoice] | None = Field(default=None, min_length=1, max_length=256)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    created: int | None = Field(default=None, ge=0)


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = _STRICT
    model: str
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={
        "maxProperties": 0, "description": "Not supported: only an empty object or null."})
    # servekit extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    # None: the server's choice (True, or False when the tool-call format needs them)
    skip_special_tokens: bool | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None
    # accepted only with the gateway secret (docs/gateway.md): resume a cut stream
    servekit_resume: SkipJsonSchema[ResumeExtension | None] = Field(default=None, exclude=True)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (text or token ids) or a batch of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    """One text part of a message's content array."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class FunctionCallParam(BaseModel):
    """The function of an assistant's tool call: ``arguments`` is a JSON object as text."""

    model_config = _STRICT
    name: str = Field(min_length=1)
    arguments: str


class ToolCallParam(BaseModel):
    """One tool call of an earlier assistant message, sent back in the conversation."""

    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessageParam(BaseModel):
    """One chat message; the model's chat template renders the list."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    #: An assistant message's tool calls.
    tool_calls: list[ToolCallParam] | None = None
    #: A ``tool`` message: the id of the call it answers.
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # [{"type": "function", "function": {"name", "description", "parameters"}}]; checked by
    # servekit.structured.tools.tool_names (errors name tools[i]...)
    tools: list[Any] | None = None
    # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def check_text(value: Any, param: str = "") -> None:
    """400 naming the field when a string holds a lone surrogate (JSON allows ``"\\ud800"``,
    but it is not Unicode text: no tokenizer or encoder can take it)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"Invalid value for '{param or 'body'}': it contains a lone surrogate "
                f"(\\u{ord(value[exc.start]):04x} at character {exc.start}), which is not "
                "valid Unicode text", param=param or None) from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            check_text(getattr(value, name), f"{param}.{name}" if param else name)
    elif isinstance(value, list) and value and not isinstance(value[0], int):
        for i, item in enumerate(value):
            check_text(item, f"{param}.[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            check_text(item, f"{param}.{key}" if isinstance(key, str) else param)


def bad_request_from_validation(exc: ValidationError | Any) -> InvalidRequestError:
    """A 400 for the first pydantic error, naming the field as OpenAI does (``messages.[0].role``)."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return InvalidRequestError("invalid request body")
    # a lone surrogate fails every member of a union; the string member says why
    first = next((e for e in errors if e.get("type") == "string_unicode"), errors[0])
    if first.get("type") == "string_unicode":
        param = _param_name(first.get("loc", ()))
        return InvalidRequestError(f"Invalid value for '{param}': it contains a lone surrogate, "
                               "which is not valid Unicode text", param=param)
    if first.get("type") == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request")
    if first.get("type") == "model_attributes_type" or tuple(first.get("loc", ())) == ("body",):
        return InvalidRequestError("the request body must be a JSON object")
    param = _param_name(first.get("loc", ()))
    if first.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'", param=param)
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return InvalidRequestError(f"Invalid value for '{param}': {first.get('msg')} (got {shown})",
                           param=param)


def _param_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _FIELD_NAMES:
            parts.append(item)
        # other strings are pydantic's union-member tags ("str", "list[int]"): not fields
    return ".".join(parts) if parts else "body"


_FIELD_NAMES: frozenset[str] = frozenset(
    name
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessageParam, TextPart, StreamOptions,
                  ToolCallParam, FunctionCallParam)
    for name in model.model_fields
)
