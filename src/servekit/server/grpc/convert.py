"""Between the proto messages and the server's :class:`Job`: requests in, chunks and responses out.

Transport-free: the gRPC servicer and the REST mapping both build jobs and messages here, so a
request means the same thing, and is refused with the same error naming the same field, on
either way in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from servekit._optional import require
from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.limit.keys import ApiKey
from servekit.protocol.errors import InvalidRequestError, StatusError
from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.server.service import GenerationService, Job
from servekit.server.tools import (
    NO_TOOLS,
    ToolOutputs,
    ToolPlan,
    compile_guided,
    plan_tool_fields,
    template_messages,
)
from servekit.structured.openai import guided_from_response_format
from servekit.structured.tools import ToolCall, ToolCallDelta

require("google.protobuf", "grpc")
from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402

__all__ = ["ChunkEncoder", "ResponseBuilder", "build_job", "check_output", "usage_message"]

FINISH_REASONS: dict[str | None, pb.FinishReason] = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_CHOICES = 16
MAX_STOP = 16
#: max_tokens when a prompt request leaves it unset (OpenAI's /v1/completions default).
DEFAULT_PROMPT_MAX_TOKENS = 16


async def build_job(service: GenerationService, req: Any, key: ApiKey | None
                    ) -> tuple[Job, ToolPlan]:
    """Validate a ``GenerateRequest`` and turn it into a job (not yet admitted) and the plan of
    its tool fields (what the encoders parse calls with).

    Raises the server's API errors: 400 naming the field, 404 for an unknown model, 503 when the
    server is not accepting requests. ``response_format``, ``tools`` and ``tool_choice`` are
    validated and compiled by the HTTP API's own code (``servekit.server.tools``).
    """
    if not req.model:
        raise InvalidRequestError("Missing required parameter: 'model'", param="model")
    service.check_model(req.model)
    kind = req.WhichOneof("input")
    default_max: int | None = DEFAULT_PROMPT_MAX_TOKENS
    plan = NO_TOOLS
    tools, choice = _tools(req), _tool_choice(req)
    if kind != "chat" and (tools or choice is not None):
        field = "tools" if tools else "tool_choice"
        raise InvalidRequestError(f"'{field}' needs a chat request", param=field)
    response_format = _response_format(req)
    if kind == "chat":
        if tools or choice is not None:
            plan = await plan_tool_fields(
                tools, choice, _opt(req, "parallel_tool_calls", None), response_format,
                service.chat_template())
        ids = await service.encode_chat(_messages(req.chat.messages), plan.prompt_tools)
        default_max = None
    elif kind == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        ids = (await service.encode_prompts(req.prompt))[0]
    elif kind == "prompt_token_ids":
        token_ids = list(req.prompt_token_ids.ids)
        if not token_ids:
            raise InvalidRequestError("prompt_token_ids must not be empty", param="prompt_token_ids")
        try:
            ids = (await service.encode_prompts(token_ids))[0]
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"prompt_token_ids: {exc.message}",
                                  param="prompt_token_ids") from exc
    else:
        raise InvalidRequestError("Missing required parameter: one of 'prompt', 'prompt_token_ids' "
                              "or 'chat'", param="prompt")
    n = req.n or 1
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    if len(req.stop) > MAX_STOP:
        raise InvalidRequestError(f"at most {MAX_STOP} stop sequences", param="stop")
    requested = req.max_tokens if req.HasField("max_tokens") else default_max
    max_tokens = service.resolve_max_tokens(requested, len(ids), "max_tokens")
    seed = req.seed if req.HasField("seed") else None
    guided = plan.guided or _guided(response_format)
    choices = [(0, sampling_params(req, max_tokens, None if seed is None else seed + j, guided,
                                   plan.keep_special_tokens)) for j in range(n)]
    await compile_guided(service.engine, guided, "tools" if plan.guided is not None else None)
    return Job(service.new_request_id("gen"), req.model, key, [ids], choices), plan


def _json_text(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid value for '{param}': not JSON text: {exc}",
                                  param=param) from exc


def _response_format(req: Any) -> dict[str, Any] | None:
    """``response_format`` in OpenAI's shape (its schema parsed), for the shared validation."""
    if not req.HasField("response_format"):
        return None
    rf = req.response_format
    out: dict[str, Any] = {"type": rf.type}
    if rf.HasField("json_schema"):
        js = rf.json_schema
        spec: dict[str, Any] = {"name": js.name, "strict": js.strict}
        if js.schema:
            spec["schema"] = _json_text(js.schema, "response_format.json_schema.schema")
        out["json_schema"] = spec
    if rf.type == "structural_tag":
        out.update(triggers=list(rf.triggers), at_least_one=rf.at_least_one,
                   stop_after_first=rf.stop_after_first, structures=[
                       {"begin": t.begin, "end": t.end,
                        "schema": _json_text(t.schema or "{}",
                                             f"response_format.structures[{i}].schema")}
                       for i, t in enumerate(rf.structures)])
    return out


def _guided(response_format: Mapping[str, Any] | None) -> GuidedDecoding | None:
    try:
        return guided_from_response_format(response_format)
    except InvalidParameterError as exc:
        raise InvalidRequestError(f"Invalid value for '{exc.param}': "
                                  f"{str(exc).split(': ', 1)[-1]}", param=exc.param) from exc


def _tools(req: Any) -> list[dict[str, Any]]:
    """``tools`` in OpenAI's shape (parameters parsed); the shared validation checks the rest."""
    out = []
    for i, tool in enumerate(req.tools):
        fn: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            fn["description"] = tool.function.description
        if tool.function.parameters:
            fn["parameters"] = _json_text(tool.function.parameters,
                                          f"tools[{i}].function.parameters")
        out.append({"type": tool.type, "function": fn})
    return out


def _tool_choice(req: Any) -> str | dict[str, Any] | None:
    if not req.HasField("tool_choice"):
        return None
    which = req.tool_choice.WhichOneof("choice")
    if which == "mode":
        return str(req.tool_choice.mode)
    if which == "function":
        return {"type": "function", "function": {"name": req.tool_choice.function}}
    return None


def _messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidRequestError("chat.messages must not be empty", param="chat.messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"chat.messages[{i}].role must be one of {sorted(ROLES)}, "
                                  f"got {m.role!r}", param=f"chat.messages[{i}].role")
        out.append({"role": m.role, "content": m.content, "name": m.name,
                    "tool_call_id": m.tool_call_id,
                    "tool_calls": [{"id": c.id, "name": c.function.name,
                                    "arguments": c.function.arguments} for c in m.tool_calls]})
    return template_messages(out, root="chat.messages", at="[{}]")


def _opt(req: Any, name: str, default: Any) -> Any:
    return getattr(req, name) if req.HasField(name) else default


def sampling_params(req: Any, max_tokens: int, seed: int | None,
                    guided: GuidedDecoding | None = None,
                    keep_special_tokens: bool = False) -> SamplingParams:
    """The request's SamplingParams; an out-of-range value is a 400 naming the field.
    ``keep_special_tokens``: the default of ``skip_special_tokens`` is False (the request's
    own value wins)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_opt(req, "temperature", 1.0),
            top_p=_opt(req, "top_p", 1.0),
            top_k=_opt(req, "top_k", 0),
            min_p=_opt(req, "min_p", 0.0),
            repetition_penalty=_opt(req, "repetition_penalty", 1.0),
            presence_penalty=_opt(req, "presence_penalty", 0.0),
            frequency_penalty=_opt(req, "frequency_penalty", 0.0),
            seed=seed,
            logprobs=_opt(req, "logprobs", None),
            stop=tuple(req.stop),
            ignore_eos=req.ignore_eos,
            guided=guided,
            skip_special_tokens=_opt(req, "skip_special_tokens", not keep_special_tokens),
        )
    except InvalidParameterError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from exc


def check_output(out: RequestOutput) -> None:
    """Raise a 500 for a delta that reports an engine failure."""
    if out.finish_reason == "error":
        raise StatusError(out.error or "the engine failed on this request")


def usage_message(job: Job) -> Any:
    """The job's ``Usage`` message."""
    u = job.usage
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens, cached_tokens=u.cached_tokens)


def _logprobs(items: Sequence[TokenLogprob]) -> list[Any]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
            for lp in items]


def _tool_calls(calls: Sequence[ToolCall | ToolCallDelta]) -> list[Any]:
    """``ToolCall`` messages of a message's calls (index = place) or a chunk's call pieces
    (a call's first piece with id, type and name; later ones only arguments)."""
    out = []
    for k, c in enumerate(calls):
        index = c.index if isinstance(c, ToolCallDelta) else k
        out.append(pb.ToolCall(id=c.id or "", type="function" if c.id else "", index=index,
                               function=pb.FunctionCall(name=c.name or "",
                                                        arguments=c.arguments)))
    return out


def _outputs(job: Job, plan: ToolPlan) -> ToolOutputs | None:
    return (None if plan.parser is None
            else ToolOutputs(plan.parser, len(job.choices), plan.parallel))


class ChunkEncoder:
    """One ``GenerateChunk`` per delta; the first carries model and created, :meth:`final` usage.

    With a tool parser in ``plan``, a chunk's ``text`` is content only and the calls a delta
    produced go out in ``tool_calls``: a call's first piece with id and name, then its arguments
    as they grow (the HTTP stream's :class:`ToolOutputs`).
    """

    __slots__ = ("_first", "_id", "_tools", "job")

    def __init__(self, job: Job, plan: ToolPlan = NO_TOOLS) -> None:
        self.job = job
        self._id = job.request_id
        self._first = True
        self._tools = _outputs(job, plan)

    def chunk(self, i: int, out: RequestOutput) -> Any:
        """The chunk of choice ``i``'s delta ``out`` (raises on an engine failure)."""
        if out.finish_reason == "error":
            check_output(out)
        tools = self._tools
        if tools is None:
            msg = pb.GenerateChunk(id=self._id, index=i, text=out.new_text,
                                   token_ids=out.new_token_ids)
            reason = out.finish_reason
        else:
            content, calls = tools.feed(i, out.new_text, out.finished)
            msg = pb.GenerateChunk(id=self._id, index=i, text=content,
                                   token_ids=out.new_token_ids, tool_calls=_tool_calls(calls))
            reason = ToolOutputs.finish_reason(out.finish_reason, tools.sent(i))
        if out.finished:
            msg.finish_reason = FINISH_REASONS.get(reason, pb.FINISH_REASON_STOP)
        if out.logprobs:
            msg.logprobs.extend(_logprobs(out.logprobs))
        if self._first:
            self._first = False
            msg.model = self.job.model
            msg.created = self.job.created
        return msg

    def aborted(self) -> list[Any]:
        """Closing chunks (reason ABORT) for the choices that never finished (a cancelled job)."""
        return [pb.GenerateChunk(id=self._id, index=i, finish_reason=pb.FINISH_REASON_ABORT)
                for i, reason in enumerate(self.job.finish_reasons) if reason is None]

    def final(self) -> Any:
        """The last chunk: ``final`` set, with the job's usage."""
        msg = pb.GenerateChunk(id=self._id, final=True, usage=usage_message(self.job))
        if self._first:
            msg.model = self.job.model
            msg.created = self.job.created
        return msg


def _final_reason(reason: str | None) -> pb.FinishReason:
    # a choice that never finished was cancelled (the server drained under it)
    return pb.FINISH_REASON_ABORT if reason is None else FINISH_REASONS.get(
        reason, pb.FINISH_REASON_STOP)


class ResponseBuilder:
    """Accumulates every choice's deltas into one ``GenerateResponse``."""

    __slots__ = ("_logprobs", "_texts", "_tokens", "_tools", "job")

    def __init__(self, job: Job, plan: ToolPlan = NO_TOOLS) -> None:
        self.job = job
        self._tools = _outputs(job, plan)
        n = len(job.choices)
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    async def add(self, i: int, out: RequestOutput) -> None:
        """Take choice ``i``'s delta (an ``OnOutput`` callback for ``GenerationService.run``)."""
        check_output(out)
        self._texts[i].append(out.new_text)
        self._tokens[i].extend(out.new_token_ids)
        if out.logprobs:
            self._logprobs[i].extend(out.logprobs)

    def response(self) -> Any:
        """The whole response (after the job ran)."""
        job = self.job
        choices = [self._choice(i) for i in range(len(job.choices))]
        return pb.GenerateResponse(id=job.request_id, model=job.model, created=job.created,
                                   choices=choices, usage=usage_message(job))

    def _choice(self, i: int) -> Any:
        text, reason = "".join(self._texts[i]), self.job.finish_reasons[i]
        choice = pb.Choice(index=i, text=text, token_ids=self._tokens[i],
                           finish_reason=_final_reason(reason),
                           logprobs=_logprobs(self._logprobs[i]))
        if self._tools is not None:
            content, calls = self._tools.parse(text)
            choice.text = ToolOutputs.message_content(content, len(calls)) or ""
            choice.tool_calls.extend(_tool_calls(calls))
            if reason is not None:
                choice.finish_reason = FINISH_REASONS[ToolOutputs.finish_reason(reason, len(calls))]
        return choice
