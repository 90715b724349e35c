"""Events that servekit's parts report to metrics hooks: plain, frozen, slotted data.

Timestamps are seconds from the injected monotonic clock of the part that emits the event.
Producers build an event only when a hook listens (see ``HookSet.wants``), so an unobserved
event costs nothing.
"""

from __future__ import annotations

from attrs import frozen


@frozen(slots=True)
class RequestQueued:
    """A request entered the waiting queue."""

    request_id: str
    tenant: str | None
    prompt_tokens: int
    time: float


@frozen(slots=True)
class RequestScheduled:
    """A request was scheduled for the first time (queue time = time - arrival_time)."""

    request_id: str
    tenant: str | None
    arrival_time: float
    cached_tokens: int
    time: float


@frozen(slots=True)
class RequestPreempted:
    """A running request was preempted (its KV blocks freed, to be recomputed)."""

    request_id: str
    tenant: str | None
    time: float


@frozen(slots=True)
class FirstToken:
    """A request produced its first output token (TTFT = time - arrival_time)."""

    request_id: str
    tenant: str | None
    arrival_time: float
    time: float


@frozen(slots=True)
class NewTokens:
    """A request produced ``num_tokens`` output tokens in one step.

    ``previous_time`` is when the request last produced tokens, so inter-token latency is
    ``(time - previous_time) / num_tokens`` without per-token events.
    """

    request_id: str
    tenant: str | None
    num_tokens: int
    previous_time: float
    time: float


@frozen(slots=True)
class RequestFinished:
    """A request ended, for any reason (``stop``, ``length``, ``abort``, ``error``)."""

    request_id: str
    tenant: str | None
    reason: str
    prompt_tokens: int
    output_tokens: int
    cached_prompt_tokens: int
    num_preemptions: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    time: float


@frozen(slots=True)
class EngineStep:
    """One engine step ran: its batch, its token count and how long it took."""

    batch_size: int
    scheduled_tokens: int
    num_running: int
    num_waiting: int
    duration: float
    time: float


@frozen(slots=True)
class CacheStats:
    """KV cache state after a step; prefix counters are cumulative token counts."""

    usage: float
    prefix_queries: int
    prefix_hits: int
    time: float


@frozen(slots=True)
class RateLimitDecision:
    """A rate-limit decision for a key (``shadow`` decisions are reported, never enforced)."""

    key: str
    allowed: bool
    retry_after: float
    shadow: bool
    time: float


@frozen(slots=True)
class RouteDecision:
    """A router picked ``node`` for ``key``; ``fallback`` is its index in the key's walk."""

    key: str
    node: str
    fallback: int
    time: float
