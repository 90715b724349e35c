"""The engine core's wire format: requests, deltas and errors as msgpack-ready plain data.

Used by :mod:`servekit.engine.core_process` and :mod:`servekit.engine.core_client` (the engine
core in its own process). Everything here is plain lists, dicts, strings and numbers, so one
``msgpack.packb`` carries it; floats travel as float64, so logprobs come back bit-identical.
An error crosses as ``{"type", "message", ...}`` and is raised again on the other side as the
same exception class with the same fields (``QueueFullError.retry_after``,
``InvalidParameterError.param``, ...).
"""

from __future__ import annotations

from typing import Any

import attrs

from servekit.engine.async_engine import EngineClosedError
from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.errors import ServekitError
from servekit.sched.errors import DuplicateRequestError, QueueFullError, UnknownRequestError
from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams

__all__ = [
    "RemoteEngineError",
    "error_from_wire",
    "error_to_wire",
    "output_from_wire",
    "output_to_wire",
    "params_from_wire",
    "params_to_wire",
]

_PARAM_FIELDS = tuple(f.name for f in attrs.fields(SamplingParams))


class RemoteEngineError(ServekitError, RuntimeError):
    """The engine core raised an error of a kind the wire does not carry; the message names it."""


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """``params`` as a plain dict (``guided`` as ``[kind, value]``)."""
    out = {name: getattr(params, name) for name in _PARAM_FIELDS}
    guided = params.guided
    out["guided"] = None if guided is None else [guided.kind, guided.value]
    return out


def params_from_wire(data: dict[str, Any]) -> SamplingParams:
    """The :class:`SamplingParams` of :func:`params_to_wire`'s dict (validated again)."""
    guided = data.get("guided")
    fields = {k: v for k, v in data.items() if k in _PARAM_FIELDS}
    fields["guided"] = None if guided is None else GuidedDecoding(guided[0], guided[1])
    return SamplingParams(**fields)


def output_to_wire(out: RequestOutput) -> list[Any]:
    """One delta as a list (logprobs as ``[token, logprob, [[token, logprob], ...]]``)."""
    lps = out.logprobs
    return [out.request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason,
            out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens,
            None if lps is None else [[lp.token_id, lp.logprob, lp.top] for lp in lps],
            out.error]


def output_from_wire(data: list[Any]) -> RequestOutput:
    """The :class:`RequestOutput` of :func:`output_to_wire`'s list."""
    lps = data[8]
    if lps is not None:
        data[8] = [TokenLogprob(t, lp, tuple(tuple(alt) for alt in top)) for t, lp, top in lps]
    return RequestOutput(*data)


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """An exception as a dict :func:`error_from_wire` raises again as the same type."""
    message = str(exc)
    if isinstance(exc, QueueFullError):
        return {"type": "queue_full", "limit": exc.limit, "retry_after": exc.retry_after,
                "message": message.removeprefix(f"{exc.limit}: ")}
    if isinstance(exc, InvalidParameterError):
        return {"type": "invalid_parameter", "param": exc.param,
                "message": message.removeprefix(f"{exc.param}: ")}
    if isinstance(exc, DuplicateRequestError):
        return {"type": "duplicate_request", "request_id": exc.request_id}
    if isinstance(exc, UnknownRequestError):
        return {"type": "unknown_request", "request_id": exc.request_id}
    if isinstance(exc, EngineClosedError):
        return {"type": "engine_closed", "message": message}
    return {"type": "error", "message": f"{type(exc).__name__}: {message}"}


def error_from_wire(data: dict[str, Any]) -> ServekitError:
    """The exception :func:`error_to_wire` described."""
    kind = data["type"]
    if kind == "queue_full":
        return QueueFullError(data["limit"], data["message"], retry_after=data["retry_after"])
    if kind == "invalid_parameter":
        return InvalidParameterError(data["param"], data["message"])
    if kind == "duplicate_request":
        return DuplicateRequestError(data["request_id"])
    if kind == "unknown_request":
        return UnknownRequestError(data["request_id"])
    if kind == "engine_closed":
        return EngineClosedError(data["message"])
    return RemoteEngineError(data["message"])
