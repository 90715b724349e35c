"""Events that servekit's parts report to metrics hooks: plain, frozen, slotted data.

Timestamps are seconds from the injected monotonic clock of the part that emits the event.
Producers build an event only when a hook listens (see ``HookSet.wants``), so an unobserved
event costs nothing.
"""

from __future__ import annotations

from attrs import define, frozen


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


@define(slots=True, eq=True)
class NewTokens:
    """A request produced ``num_tokens`` output tokens in one step, after its first token.

    The first token is reported by :class:`FirstToken` alone; every later step reports
    ``NewTokens``. ``previous_time`` is when the request last produced tokens, so inter-token
    latency is ``(time - previous_time) / num_tokens`` without per-token events.

    The one event built per request per step, so it is slotted but not frozen: a frozen attrs
    instance costs three times as much to build (``object.__setattr__`` per field). Treat it as
    read-only all the same.
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
    """One engine step ran: its batch, its token count and how long it took.

    The work it did (what a step-time model is fitted on, see ``servekit.sim``):
    ``prefill_tokens`` of prefill chunks, ``num_decodes`` rows generating one token each,
    ``kv_tokens`` of context whose KV the step read (new ones included) and ``attention_pairs``,
    the query-key pairs computed. ``duration`` runs from scheduling to the step's outputs, as the
    step ran in its process (a threaded forward's waits for the GIL included).

    What the serving front end had to do around it (what ``servekit.sim``'s front-end cost is
    fitted on): ``arrivals``, the requests added to the engine since the previous step ended,
    and ``output_tokens``, the tokens this step emitted (each streamed out after it).
    """

    batch_size: int
    scheduled_tokens: int
    num_running: int
    num_waiting: int
    duration: float
    time: float
    prefill_tokens: int = 0
    num_decodes: int = 0
    kv_tokens: int = 0
    attention_pairs: float = 0.0
    arrivals: int = 0
    output_tokens: int = 0


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
    tenant: str | None = None


@frozen(slots=True)
class RouteDecision:
    """A router picked ``node`` for ``key``; ``fallback`` is its index in the key's walk."""

    key: str
    node: str
    fallback: int
    time: float


#: Well-known :class:`ResourceGauge` names the server sets for leak checks.
KV_BLOCKS_IN_USE = "kv_blocks_in_use"
RATE_LIMIT_RESERVATIONS = "rate_limit_reservations"
OPEN_STREAMS = "open_streams"
#: A counter, sent as a ResourceGauge of its running total: decisions the limiter store failed.
RATE_LIMIT_STORE_ERRORS = "rate_limit_store_errors"


@frozen(slots=True)
class ResourceGauge:
    """The current amount of a held resource (``KV_BLOCKS_IN_USE``, ``OPEN_STREAMS``, ...).

    The server reports these so a soak test or a dashboard can see leaks: after the load
    stops, every one of them must return to zero.
    """

    name: str
    value: float
    time: float
