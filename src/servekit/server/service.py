"""The transport-independent core of a front end: keys, models, prompts, limits, generation.

:class:`GenerationService` does everything between a parsed request and the engine's deltas,
for any front end (the OpenAI HTTP app here; gRPC reuses it): authenticate the key, check the
model, tokenize and bound the prompt, reserve the rate limit, run one engine request per choice,
hand every delta to a callback, and — however the run ends — abort what is still running and
settle the reservation. A :class:`Job` is one API request: several prompts x ``n`` choices.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio
from attrs import define, field

from servekit.engine.async_engine import EngineClosedError
from servekit.engine.chat import ChatTemplateError, render_chat
from servekit.engine.outputs import RequestOutput
from servekit.errors import ServekitError
from servekit.limit.keyed import Admission, KeyLimits
from servekit.limit.keys import ApiKey, KeyStore
from servekit.metrics.events import OPEN_STREAMS, RATE_LIMIT_RESERVATIONS, ResourceGauge
from servekit.metrics.hooks import HookSet
from servekit.protocol.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    StatusError,
)
from servekit.sched.errors import QueueFullError
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.server.bounds import (
    MIN_BODY_BYTES,
    default_max_body_bytes,
    max_prompt_chars,
    max_token_chars,
)
from servekit.server.lifecycle import ServerState

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["EngineLike", "GenerationService", "Job", "JobUsage", "OnOutput", "OnOutputs"]

logger = logging.getLogger("servekit.server")

#: Texts up to this many characters are tokenized on the event loop (cheaper than a thread hop).
_INLINE_CHARS = 4096

#: Called with (choice index, delta) for every engine output, in order per choice.
OnOutput = Callable[[int, RequestOutput], Awaitable[None]]

#: Called with (choice index, deltas) for the deltas of a choice that were ready together
#: (one, unless the engine ``yields_batches``), in order per choice.
OnOutputs = Callable[[int, Sequence[RequestOutput]], Awaitable[None]]


class EngineLike(Protocol):
    """What the server needs of an engine: the AsyncEngine contract (docs/contracts.md).

    Optional: ``coalesces_outputs`` (``generate`` takes ``coalesce=True``: deltas that queued
    while the consumer was busy come merged into one) and ``yields_batches`` (``generate``
    takes ``batched=True``: it yields lists, every delta that was ready at once).
    """

    tokenizer: Any
    model_name: str
    max_model_len: int

    def generate(self, prompt: str | list[int], params: SamplingParams, *,
                 request_id: str | None = None, tenant: str | None = None, priority: int = 0,
                 cache_salt: str | None = None, deadline: float | None = None,
                 output_token_ids: Sequence[int] = ()) -> Any:
        """An async iterator of :class:`RequestOutput` deltas (``output_token_ids``: resume a
        generation cut short elsewhere)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op or a KeyError-like error when it is unknown)."""
        ...


@define(slots=True)
class JobUsage:
    """Token counts of a job, summed over prompts (once each) and choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@define(slots=True)
class Job:
    """One API request: ``prompts`` (token ids) and one ``(prompt index, params)`` per choice."""

    request_id: str
    model: str
    key: ApiKey | None
    prompts: list[list[int]]
    choices: list[tuple[int, SamplingParams]]
    created: int = field(factory=lambda: int(time.time()))
    usage: JobUsage = field(factory=JobUsage)
    finish_reasons: list[str | None] = field(factory=list)
    admission: Admission | None = None
    #: Per choice, the output token ids a cut-short stream already sent (a gateway's resume).
    resume: list[list[int]] | None = None
    #: Per choice of a resume, the finish reason of a choice that had already finished (it
    #: is not continued).
    resume_finished: list[str | None] | None = None

    @property
    def reserved_tokens(self) -> int:
        """What the rate limit reserves: every prompt once plus every choice's max_tokens."""
        return sum(map(len, self.prompts)) + sum(p.max_tokens for _, p in self.choices)


class GenerationService:
    """Admission and generation for one engine, shared by every front end."""

    def __init__(self, engine: EngineLike | None, *, keys: KeyStore | None = None,
                 limits: KeyLimits | None = None, state: ServerState | None = None,
                 hooks: HookSet | None = None, model_names: Sequence[str] = (),
                 clock: Callable[[], float] = time.monotonic,
                 max_body_bytes: int | None = None) -> None:
        self.engine = engine
        self.keys = keys if keys is not None else KeyStore()
        self.limits = limits if limits is not None else KeyLimits(hooks=hooks)
        self.state = state if state is not None else ServerState()
        self.hooks = hooks
        self._names = tuple(model_names)
        self._clock = clock
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
        self._counter = itertools.count()
        #: Most characters one token stands for (set by :meth:`prepare`; None: no char bound).
        self.token_chars: int | None = None
        #: Body limit in bytes (None: derived from the model by :meth:`prepare`).
        self.max_body_bytes: int | None = max_body_bytes

    # -- identity --------------------------------------------------------------------------

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names this server answers to: the configured ones, else the engine's model name."""
        if self._names:
            return self._names
        return (self.engine.model_name,) if self.engine is not None else ()

    def new_request_id(self, kind: str) -> str:
        """A process-unique request id such as ``cmpl-1a2b...-7``."""
        return f"{kind}-{self._prefix}{next(self._counter):x}"

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from an ``Authorization: Bearer`` header (None when open); else 401."""
        return self.keys.from_authorization(authorization)

    def check_model(self, model: str) -> None:
        """404 unless ``model`` is served here."""
        if model not in self.model_names:
            raise ModelNotFoundError(model)

    # -- prompts ---------------------------------------------------------------------------

    def _engine(self) -> EngineLike:
        self.state.check_accepting()
        return self._engine_or_fail()

    def prepare(self) -> None:
        """Read the bounds the engine implies (blocking: run it in a worker thread once)."""
        engine = self._engine_or_fail()
        self.token_chars = max_token_chars(engine.tokenizer)
        if self.max_body_bytes is None:
            self.max_body_bytes = default_max_body_bytes(engine.max_model_len, self.token_chars)

    @property
    def body_limit(self) -> int:
        """Largest request body accepted, bytes (413 above it)."""
        return self.max_body_bytes if self.max_body_bytes is not None else MIN_BODY_BYTES

    def _engine_or_fail(self) -> EngineLike:
        assert self.engine is not None  # ready implies an engine
        return self.engine

    async def encode_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]
                             ) -> list[list[int]]:
        """Token ids of a completion prompt (text, ids, or a batch of either); 400 when bad.

        Texts too long to fit the context are rejected from their length alone; long texts
        are tokenized in a worker thread, so no request stalls the event loop.
        """
        engine = self._engine()
        if isinstance(prompt, str):
            batch: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            batch = [prompt]
        else:
            batch = list(prompt)
        if not batch:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        texts = [item for item in batch if isinstance(item, str)]
        for text in texts:
            self._check_chars(len(text), "prompt")
        if sum(map(len, texts)) > _INLINE_CHARS:
            return await anyio.to_thread.run_sync(self._encode_batch, engine, batch)
        return self._encode_batch(engine, batch)

    def _encode_batch(self, engine: EngineLike, batch: list[Any]) -> list[list[int]]:
        vocab = len(engine.tokenizer)
        out = []
        for item in batch:
            if isinstance(item, str):
                ids = list(engine.tokenizer.encode(item, add_special_tokens=True))
            else:
                ids = list(item)
                self._check_length(len(ids), "prompt")  # before scanning a huge list
                if any(t < 0 or t >= vocab for t in ids):
                    raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="prompt")
            if not ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            self._check_length(len(ids), "prompt")
            out.append(ids)
        return out

    def chat_template(self) -> str | None:
        """The model's chat template (None when its tokenizer has none); 503 while not ready."""
        template = getattr(self._engine().tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    async def encode_chat(self, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of chat messages (and ``tools``, OpenAI function tools) through the model's
        chat template; 400 when bad."""
        engine = self._engine()
        chars = sum(len(m.get("content") or "") for m in messages)
        if tools or any("tool_calls" in m for m in messages):
            chars += len(json.dumps(tools, ensure_ascii=False)) + len(json.dumps(
                [m.get("tool_calls") for m in messages], ensure_ascii=False))
        self._check_chars(chars, "messages")
        if chars > _INLINE_CHARS:
            ids = await anyio.to_thread.run_sync(self._render_chat, engine, messages, tools)
        else:
            ids = self._render_chat(engine, messages, tools)
        self._check_length(len(ids), "messages")
        return ids

    @staticmethod
    def _render_chat(engine: EngineLike, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            if tools:
                return render_chat(engine.tokenizer, messages, tools=tools)
            return render_chat(engine.tokenizer, messages)
        except ChatTemplateError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc

    def _check_chars(self, chars: int, param: str) -> None:
        if self.token_chars is None:
            return
        bound = max_prompt_chars(self.max_model_len, self.token_chars)
        if chars > bound:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, and your "
                f"{param} has {chars} characters: more than {bound} characters cannot fit",
                param=param)

    def _check_length(self, n: int, param: str) -> None:
        limit = self.max_model_len
        if n >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, and your {param} has "
                f"{n} tokens: no room is left for the completion", param=param)

    @property
    def max_model_len(self) -> int:
        """The engine's context length."""
        assert self.engine is not None
        return self.engine.max_model_len

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """``requested`` checked against the context (None = all the room left); 400 if bad."""
        room = self.max_model_len - prompt_len
        if requested is None:
            return room
        if requested < 1:
            raise InvalidRequestError(f"{param} must be at least 1, got {requested}", param=param)
        if requested > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} for the completion). Reduce the prompt or {param}.", param=param)
        return requested

    # -- running ---------------------------------------------------------------------------

    async def admit(self, job: Job) -> Admission:
        """Reserve the job's rate limit (429 when over); returns the headers to send.

        A job with more choices than the engine can ever hold at once is a 400, not a 503:
        retrying it would never help.
        """
        self.state.check_accepting()
        capacity = admission_capacity(self.engine)
        if capacity is not None and len(job.choices) > capacity:
            param = "n" if len(job.prompts) == 1 else "prompt"
            raise InvalidRequestError(
                f"This request needs {len(job.choices)} sequences at once ({len(job.prompts)} "
                f"prompt(s) x n), but this server holds at most {capacity} (running slots plus "
                "the waiting queue); lower n or send fewer prompts per request", param=param)
        job.admission = await self.limits.areserve(job.key, job.model, job.reserved_tokens)
        self._gauge(RATE_LIMIT_RESERVATIONS, self.limits.open_reservations)
        return job.admission

    async def run(self, job: Job, on_output: OnOutput) -> None:
        """Run every choice of an admitted job, calling ``on_output`` per delta.

        Returns when all choices finished; ``job.usage`` and ``job.finish_reasons`` are then
        complete. However it ends (error, cancellation, a client gone), every engine request
        still running is aborted and the reservation is settled with the real usage.
        """
        await self._run(job, on_output, batches=False)

    async def run_batches(self, job: Job, on_outputs: OnOutputs) -> None:
        """As :meth:`run`, but ``on_outputs`` gets the deltas of a choice that were ready at
        once together (a streaming front end writes them in one message)."""
        await self._run(job, on_outputs, batches=True)

    async def _run(self, job: Job, callback: Callable[[int, Any], Awaitable[None]],
                   batches: bool) -> None:
        job.finish_reasons = [None] * len(job.choices)
        per_choice = [(0, 0, 0)] * len(job.choices)  # (prompt, completion, cached) per choice
        streams = self.state
        try:
            with streams.track() as scope:
                self._gauge(OPEN_STREAMS, streams.in_flight)
                if len(job.choices) == 1:
                    await self._drive(job, 0, callback, batches, per_choice)
                else:
                    async with anyio.create_task_group() as tg:
                        for i in range(len(job.choices)):
                            tg.start_soon(self._drive, job, i, callback, batches, per_choice)
            if scope.cancelled_caught:  # drained past the grace period: not a success
                raise ServiceUnavailableError("the server shut down before this request finished; "
                                      "retry on another replica", retry_after=self.state.retry_after,
                                      code="draining")
        except BaseExceptionGroup as group:  # one choice failed: surface its error
            first = group.exceptions[0]
            raise first if isinstance(first, Exception) else group from None
        finally:
            self._account(job, per_choice)
            await self.release(job)
            self._gauge(OPEN_STREAMS, streams.in_flight)

    async def release(self, job: Job) -> None:
        """Settle ``job``'s reservation with what it used, once (later calls do nothing).
        :meth:`run` ends so; a front end that awaits anything between :meth:`admit` and
        :meth:`run` calls it on the way out, for a job that ended before it ran."""
        admission, job.admission = job.admission, None
        if admission is not None:
            with anyio.CancelScope(shield=True):  # a cancelled job settles too
                await self.limits.asettle(admission, job.usage.total_tokens)
            self._gauge(RATE_LIMIT_RESERVATIONS, self.limits.open_reservations)

    async def _drive(self, job: Job, i: int, callback: Callable[[int, Any], Awaitable[None]],
                     batches: bool, per_choice: list[tuple[int, int, int]]) -> None:
        engine = self.engine
        assert engine is not None
        prompt_index, params = job.choices[i]
        rid = job.request_id if len(job.choices) == 1 else f"{job.request_id}-{i}"
        key = job.key
        extra: dict[str, Any] = {}
        if getattr(engine, "coalesces_outputs", False):
            extra["coalesce"] = True  # deltas queued while the client is slow go out merged
        batched = getattr(engine, "yields_batches", False)
        if batched:
            extra["batched"] = True
        if job.resume is not None:
            done = job.resume_finished[i] if job.resume_finished is not None else None
            if done is not None:  # finished before the cut: counted, not continued
                per_choice[i] = (len(job.prompts[prompt_index]), len(job.resume[i]), 0)
                job.finish_reasons[i] = done
                return
            if job.resume[i]:
                extra["output_token_ids"] = job.resume[i]
        stream = engine.generate(
            job.prompts[prompt_index], params, request_id=rid,
            tenant=key.tenant if key is not None else None,
            cache_salt=key.salt if key is not None else None, **extra)
        finished = False
        out: RequestOutput | None = None
        try:
            async for item in stream:
                outs = item if batched else (item,)
                out = outs[-1]  # only a batch's last delta may be the final one
                if out.finished:
                    finished = True
                    job.finish_reasons[i] = out.finish_reason
                if batches:
                    await callback(i, outs)
                else:
                    for one in outs:
                        await callback(i, one)
        except QueueFullError as exc:
            raise ServiceUnavailableError(f"The server is overloaded ({exc}); retry later",
                                  retry_after=exc.retry_after) from exc
        except InvalidParameterError as exc:  # the engine's own checks, e.g. token ids
            raise InvalidRequestError(str(exc), param=exc.param) from exc
        except EngineClosedError as exc:  # the engine loop (or its core process) is gone
            raise StatusError(f"The engine stopped before this request finished: {exc}",
                              code="engine_failed") from exc
        finally:
            if out is not None:  # the counts are cumulative: the last delta has them all
                per_choice[i] = (out.num_prompt_tokens, out.num_output_tokens,
                                 out.num_cached_tokens)
            if not finished:
                with anyio.CancelScope(shield=True):
                    await _close(stream)
                    await _abort(engine, rid)

    def _account(self, job: Job, per_choice: list[tuple[int, int, int]]) -> None:
        usage = job.usage
        seen: set[int] = set()
        for (prompt_index, _), (n_prompt, n_out, n_cached) in zip(job.choices, per_choice, strict=True):
            usage.completion_tokens += n_out
            if prompt_index not in seen:
                seen.add(prompt_index)
                usage.prompt_tokens += n_prompt or len(job.prompts[prompt_index])
                usage.cached_tokens += n_cached

    def _gauge(self, name: str, value: float) -> None:
        hooks = self.hooks
        if hooks is not None and hooks.wants.resource_gauge:
            hooks.on_resource_gauge(ResourceGauge(name, float(value), self._clock()))


def admission_capacity(engine: Any) -> int | None:
    """Requests ``engine`` can hold at once (running slots + waiting bound); None if unbounded."""
    capacity = getattr(engine, "admission_capacity", None)
    if capacity is not None:
        return int(capacity)
    scheduler = getattr(getattr(engine, "engine", None), "scheduler", None)  # AsyncEngine
    bound = getattr(scheduler, "max_waiting_requests", None)
    if scheduler is None or bound is None:
        return None
    return int(scheduler.max_num_seqs) + int(bound)


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing an engine stream failed")


async def _abort(engine: EngineLike, request_id: str) -> None:
    with contextlib.suppress(KeyError, ServekitError):  # already finished and forgotten
        await engine.abort(request_id)
