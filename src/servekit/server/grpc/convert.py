"""Between the proto messages and the server's :class:`Job`: requests in, chunks and responses out.

Transport-free: the gRPC servicer and the REST mapping both build jobs and messages here, so a
request means the same thing, and is refused with the same error naming the same field, on
either way in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from servekit._optional import require
from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.limit.keys import ApiKey
from servekit.protocol.errors import InvalidRequestError, StatusError
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.server.service import GenerationService, Job

require("google.protobuf", "grpc")
from servekit.protocol.grpc_gen import servekit_pb2 as pb  # noqa: E402

__all__ = ["ChunkEncoder", "ResponseBuilder", "build_job", "check_output", "usage_message"]

FINISH_REASONS: dict[str | None, pb.FinishReason] = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_CHOICES = 16
MAX_STOP = 16
#: max_tokens when a prompt request leaves it unset (OpenAI's /v1/completions default).
DEFAULT_PROMPT_MAX_TOKENS = 16


async def build_job(service: GenerationService, req: Any, key: ApiKey | None) -> Job:
    """Validate a ``GenerateRequest`` and turn it into a job (not yet admitted).

    Raises the server's API errors: 400 naming the field, 404 for an unknown model, 503 when the
    server is not accepting requests.
    """
    if not req.model:
        raise InvalidRequestError("Missing required parameter: 'model'", param="model")
    service.check_model(req.model)
    kind = req.WhichOneof("input")
    default_max: int | None = DEFAULT_PROMPT_MAX_TOKENS
    if kind == "chat":
        ids = await service.encode_chat(_messages(req.chat.messages))
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
    choices = [(0, sampling_params(req, max_tokens, None if seed is None else seed + j))
               for j in range(n)]
    return Job(service.new_request_id("gen"), req.model, key, [ids], choices)


def _messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidRequestError("chat.messages must not be empty", param="chat.messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"chat.messages[{i}].role must be one of {sorted(ROLES)}, "
                                  f"got {m.role!r}", param=f"chat.messages[{i}].role")
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        out.append(message)
    return out


def _opt(req: Any, name: str, default: Any) -> Any:
    return getattr(req, name) if req.HasField(name) else default


def sampling_params(req: Any, max_tokens: int, seed: int | None) -> SamplingParams:
    """The request's SamplingParams; an out-of-range value is a 400 naming the field."""
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


class ChunkEncoder:
    """One ``GenerateChunk`` per delta; the first carries model and created, :meth:`final` usage."""

    __slots__ = ("_first", "_id", "job")

    def __init__(self, job: Job) -> None:
        self.job = job
        self._id = job.request_id
        self._first = True

    def chunk(self, i: int, out: RequestOutput) -> Any:
        """The chunk of choice ``i``'s delta ``out`` (raises on an engine failure)."""
        if out.finish_reason == "error":
            check_output(out)
        msg = pb.GenerateChunk(id=self._id, index=i, text=out.new_text,
                               token_ids=out.new_token_ids)
        if out.finished:
            msg.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_STOP)
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

    __slots__ = ("_logprobs", "_texts", "_tokens", "job")

    def __init__(self, job: Job) -> None:
        self.job = job
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
        choices = [
            pb.Choice(index=i, text="".join(self._texts[i]), token_ids=self._tokens[i],
                      finish_reason=_final_reason(job.finish_reasons[i]),
                      logprobs=_logprobs(self._logprobs[i]))
            for i in range(len(job.choices))
        ]
        return pb.GenerateResponse(id=job.request_id, model=job.model, created=job.created,
                                   choices=choices, usage=usage_message(job))
