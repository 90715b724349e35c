"""Tools in the SDK: JSON schemas from Python functions, and the agent loop of ``run_tools``.

:func:`function_tool` describes a function (sync or async) as an OpenAI function tool from its
signature, type hints and docstring. :class:`ToolLoop` is the I/O-free core of
:meth:`Client.run_tools <servekit.client.http.Client.run_tools>` and its async twin: it keeps
the conversation, builds each turn's request fields, and turns each requested call into the
function to run or an error for the model to read.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union

import anyio
from attrs import define, field, frozen

from servekit.client.types import ChatCompletion, ToolCall, Usage

__all__ = ["FunctionTool", "ToolLoop", "ToolRun", "function_tool"]


@frozen(slots=True)
class FunctionTool:
    """A Python function offered to the model: its name, description and parameters schema."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def function_tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
                  description: str | None = None) -> Any:
    """Describe ``fn`` as a tool (usable as ``@function_tool`` or ``@function_tool(name=...)``).

    Parameters become the properties of an object schema (no default: required); hints map
    to JSON types: ``str``, ``int``, ``float``, ``bool``, ``None``, ``list[X]``, ``tuple``,
    ``dict``, ``Literal[...]``, ``Enum`` subclasses, ``X | None`` and unions, pydantic models;
    ``Annotated[X, {...}]`` adds the dict's keywords (``{"maximum": 9}``) to ``X``'s schema;
    an unannotated parameter accepts any value. The description is the docstring's first
    paragraph. Raises TypeError for ``*args`` / ``**kwargs`` or a hint with no JSON form.
    """
    if fn is None:
        return functools.partial(function_tool, name=name, description=description)
    if isinstance(fn, FunctionTool):
        return fn
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    props: dict[str, Any] = {}
    required = []
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{fn.__name__}: parameter {param.name!r} cannot be passed by name")
        props[param.name] = _schema(hints[param.name]) if param.name in hints else {}
        if param.default is param.empty:
            required.append(param.name)
    doc = inspect.getdoc(fn) or ""
    return FunctionTool(fn, name or fn.__name__,
                        description if description is not None else doc.split("\n\n")[0].strip(),
                        {"type": "object", "properties": props, "required": required,
                         "additionalProperties": False})


_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
    bool: {"type": "boolean"}, type(None): {"type": "null"}, Any: {},
}


def _schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and hint in _SCALARS:
        return dict(_SCALARS[hint])
    if origin is Annotated:  # Annotated[int, {"minimum": 0}]: dict metadata joins the schema
        schema = _schema(args[0])
        for extra in hint.__metadata__:
            if isinstance(extra, Mapping):
                schema.update(extra)
        return schema
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema(a) for a in args]}
    if origin in (list, set, frozenset, Sequence) or hint in (list, set, frozenset):
        return {"type": "array", **({"items": _schema(args[0])} if args else {})}
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0])}
        return {"type": "array", **({"prefixItems": [_schema(a) for a in args],
                                     "minItems": len(args), "maxItems": len(args)} if args else {})}
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if isinstance(hint, type) and hasattr(hint, "model_json_schema"):
        return dict(hint.model_json_schema())
    raise TypeError(f"cannot describe {hint!r} as a JSON schema")


@frozen(slots=True)
class ToolRun:
    """What :meth:`run_tools` ended with.

    ``completed``: the model gave a final answer (a turn without tool calls) within
    ``max_turns``; else the loop stopped after ``max_turns`` turns that all asked for tools
    (``content`` is then None). ``messages``: the whole conversation, the tool calls and
    results included; ``usage``: summed over every turn.
    """

    content: str | None
    completed: bool
    messages: list[dict[str, Any]]
    completions: list[ChatCompletion]
    usage: Usage

    @property
    def turns(self) -> int:
        """Model calls made."""
        return len(self.completions)


@define(slots=True)
class ToolLoop:
    """The agent loop without I/O: conversation, per-turn request fields, call dispatch.

    ``tool_choice`` applies to the first turn only (e.g. ``"required"`` to force a call);
    later turns are ``"auto"``, so the model can answer once it has the results.
    """

    messages: list[dict[str, Any]]
    tools: dict[str, FunctionTool]
    max_turns: int
    tool_choice: Any = None
    completions: list[ChatCompletion] = field(factory=list)
    usage: Usage = field(factory=lambda: Usage(0, 0, 0))

    @classmethod
    def create(cls, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any], max_turns: int,
               tool_choice: Any = None) -> ToolLoop:
        """A loop over copies of ``messages``; ``tools`` are callables or FunctionTools."""
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        described = [function_tool(t) for t in tools]
        by_name = {t.name: t for t in described}
        if len(by_name) != len(described):
            raise ValueError("two tools have the same name")
        return cls([dict(m) for m in messages], by_name, max_turns, tool_choice)

    @property
    def more(self) -> bool:
        """Whether another model call is allowed."""
        return len(self.completions) < self.max_turns

    def request(self) -> dict[str, Any]:
        """The tool fields of the next model call."""
        choice = self.tool_choice if not self.completions else None
        if isinstance(choice, str) and choice in self.tools:  # a tool's name: that tool
            choice = {"type": "function", "function": {"name": choice}}
        return {"tools": [t.to_json() for t in self.tools.values()],
                **({"tool_choice": choice} if choice is not None else {})}

    def record(self, completion: ChatCompletion) -> tuple[ToolCall, ...]:
        """Add a turn's answer to the conversation; the calls to run (none: a final answer)."""
        self.completions.append(completion)
        if completion.usage is not None:
            self.usage = self.usage + completion.usage
        message = completion.choices[0].message
        entry: dict[str, Any] = {"role": "assistant", "content": message.content or None}
        if message.tool_calls:
            entry["tool_calls"] = [c.to_json() for c in message.tool_calls]
        self.messages.append(entry)
        return message.tool_calls

    def prepare(self, call: ToolCall) -> tuple[FunctionTool, dict[str, Any]] | str:
        """The tool and keyword arguments of ``call``, or the error to report to the model."""
        tool = self.tools.get(call.name)
        if tool is None:
            return f"unknown tool {call.name!r}; the tools are: {', '.join(self.tools)}"
        try:
            args = call.parsed_arguments()
        except ValueError as exc:
            return f"the arguments are not JSON: {exc}"
        if not isinstance(args, dict):
            return "the arguments must be a JSON object"
        try:
            return tool, _convert(tool.fn, args)
        except (TypeError, ValueError) as exc:
            return f"invalid arguments: {exc}"

    def answer(self, call: ToolCall, result: Any = None, error: str | None = None) -> None:
        """Append the ``tool`` message answering ``call`` (a result, or an error)."""
        if error is not None:
            content = json.dumps({"error": error}, ensure_ascii=False)
        elif isinstance(result, str):
            content = result
        else:
            content = json.dumps(result, ensure_ascii=False, default=str)
        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": content})

    def result(self) -> ToolRun:
        """The run so far: completed when the last turn asked for no tool."""
        last = self.completions[-1].choices[0].message if self.completions else None
        completed = last is not None and not last.tool_calls
        return ToolRun(last.content if completed and last is not None else None, completed,
                       self.messages, self.completions, self.usage)

    # -- running one call (the two clients differ only here) --------------------------------

    def run_sync(self, call: ToolCall) -> None:
        """Run ``call`` in this thread (an async function under ``anyio.run``) and answer it."""
        prepared = self.prepare(call)
        if isinstance(prepared, str):
            return self.answer(call, error=prepared)
        tool, args = prepared
        try:
            result = tool.fn(**args)
            if inspect.isawaitable(result):
                result = anyio.run(_wait, result)
        except Exception as exc:  # the model reads what went wrong and may try again
            return self.answer(call, error=f"{type(exc).__name__}: {exc}")
        return self.answer(call, result)

    async def run_async(self, call: ToolCall) -> None:
        """Run ``call``: an async function awaited, a sync one in a worker thread; answer it."""
        prepared = self.prepare(call)
        if isinstance(prepared, str):
            return self.answer(call, error=prepared)
        tool, args = prepared
        try:
            if inspect.iscoroutinefunction(tool.fn):
                result = await tool.fn(**args)
            else:
                result = await anyio.to_thread.run_sync(functools.partial(tool.fn, **args))
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            return self.answer(call, error=f"{type(exc).__name__}: {exc}")
        return self.answer(call, result)


def _convert(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with Enum and pydantic-model parameters turned into their types."""
    hints = typing.get_type_hints(fn)
    out = dict(args)
    for key, value in args.items():
        hint = hints.get(key)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            out[key] = hint(value)
        elif isinstance(hint, type) and hasattr(hint, "model_validate"):
            out[key] = hint.model_validate(value)
    return out


async def _wait(awaitable: Any) -> Any:
    return await awaitable
