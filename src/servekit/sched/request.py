"""One request's scheduling state: its tokens, parameters, status and timings.

:class:`Request` subclasses the KV manager's :class:`~servekit.kv.manager.KVSequence`, so the
scheduler hands it to the manager directly. It is a mutable, slotted object owned by the
scheduler once added: read it freely, change it only through the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from servekit.kv.manager import KVSequence
from servekit.sched.params import InvalidParameterError, SamplingParams


class RequestStatus(Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    """Queued, never scheduled."""
    RUNNING = "running"
    """Holds KV blocks and is scheduled every step (prefilling or decoding)."""
    PREEMPTED = "preempted"
    """Was running; its blocks were freed and it waits to be recomputed."""
    FINISHED = "finished"
    """Done; ``finish_reason`` says why. Holds no blocks."""


class FinishReason(str, Enum):
    """Why a request finished (the OpenAI ``finish_reason`` strings)."""

    STOP = "stop"
    """An end-of-sequence or stop token was sampled (or the engine matched a stop string)."""
    LENGTH = "length"
    """``max_tokens`` output tokens, or the model's maximum length, were reached."""
    ABORT = "abort"
    """Aborted by the caller, or its deadline passed."""
    ERROR = "error"
    """The engine failed the request (``Request.error`` says why)."""


WAITING = RequestStatus.WAITING
RUNNING = RequestStatus.RUNNING
PREEMPTED = RequestStatus.PREEMPTED
FINISHED = RequestStatus.FINISHED


class Request(KVSequence):
    """A generation request: prompt token ids, sampling parameters and scheduling attributes.

    ``token_ids`` holds the prompt followed by the generated tokens. ``priority``: lower values
    are served first (used by :class:`~servekit.sched.policy.PriorityPolicy`). ``tenant`` groups
    requests for fair share. ``arrival_time`` defaults to the scheduler's clock when added.
    ``deadline`` is an absolute time on the scheduler's clock after which the request is aborted.
    ``output_token_ids`` resumes a generation elsewhere cut short: tokens already generated,
    prefilled with the prompt and counted as output (``max_tokens``, penalties, usage).
    """

    __slots__ = (
        "_num_computed",
        "arrival_time",
        "deadline",
        "error",
        "finish_reason",
        "first_scheduled_time",
        "first_token_time",
        "last_token_time",
        "min_len",
        "num_cached_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "params",
        "policy_key",
        "prefilling",
        "priority",
        "rank",
        "request_id",
        "status",
        "stop_ids",
        "stop_len",
        "tenant",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        arrival_time: float | None = None,
        deadline: float | None = None,
        cache_salt: str | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidParameterError("request_id", f"must be a non-empty string, got {request_id!r}")
        if isinstance(prompt_token_ids, (str, bytes)):
            raise InvalidParameterError("prompt_token_ids", "must be a sequence of token ids, not text")
        tokens = list(prompt_token_ids)
        if not tokens:
            raise InvalidParameterError("prompt_token_ids", "must not be empty")
        for t in tokens:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidParameterError(
                    "prompt_token_ids", f"must be non-negative integers, got {t!r}"
                )
        outputs = list(output_token_ids)
        for t in outputs:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidParameterError(
                    "output_token_ids", f"must be non-negative integers, got {t!r}"
                )
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidParameterError("params", f"must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"must be an integer, got {priority!r}")
        num_prompt = len(tokens)
        super().__init__(request_id, tokens + outputs, cache_salt)
        self.request_id = request_id
        self.params = params
        self.priority = priority
        self.tenant = tenant
        self.arrival_time = -1.0 if arrival_time is None else float(arrival_time)
        self.deadline = deadline
        self.num_prompt_tokens = num_prompt
        self.status = WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._num_computed = 0  # while prefilling; read num_computed_tokens
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        # Scheduler-private, set when the scheduler admits the request:
        self.prefilling = True  # has not sampled since it was (re)admitted
        self.stop_ids: frozenset[int] = frozenset()  # eos (unless ignore_eos) + stop_token_ids
        self.stop_len = 0  # finish with "length" when len(token_ids) reaches this
        self.min_len = 0  # stop tokens are ignored while len(token_ids) < min_len
        self.policy_key: object = None  # the policy's waiting-order key
        self.rank: Any = 0  # running-order key (SchedulingPolicy.running_rank)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is in the cache: all but the last once the request decodes."""
        return self._num_computed if self.prefilling else len(self.token_ids) - 1

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated tokens."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        """A copy of the prompt tokens."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def finished(self) -> bool:
        """True once the request has finished, for any reason."""
        return self.status is FINISHED

    def __repr__(self) -> str:
        reason = f" {self.finish_reason.value}" if self.finish_reason is not None else ""
        return (
            f"Request({self.request_id!r}, {self.status.value}{reason}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
