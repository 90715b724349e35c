"""The usage record of one finished client request, and the :class:`UsageSink` interface.

A sink is a ``usage_sink`` plugin (interface version 1, see :mod:`servekit.plugins`). Billing
depends on it, so unlike a metrics hook a sink is not best-effort: ``write`` either commits the
whole batch or raises, and a batch may be delivered more than once (a worker died between the
sink's commit and the outbox's delete), so ``write`` must be idempotent on
:attr:`UsageRecord.idempotency_key`: a record whose key the sink already holds is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from attrs import field, frozen

from servekit import plugins


def _non_negative(_: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _utc(_: Any, attribute: Any, value: datetime) -> None:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{attribute.name} must be a timezone-aware datetime, got {value!r}")


@frozen(slots=True, kw_only=True)
class UsageRecord:
    """What one client request used and what it was delivered.

    ``idempotency_key`` is one per client request, shared by every attempt (a gateway failover
    is still one record); ``key_id`` is an HMAC of the API key under a server secret, never the
    key. ``replicas`` lists the replicas that served it, in order. Token counts are what was
    computed (``prompt_tokens``, of which ``cached_tokens`` came from the prefix cache) and
    generated (``completion_tokens``); ``final_chunk_sent`` says whether the client got the end
    of the response. Times are seconds; ``queue_time`` and ``ttft`` are None when the request
    never got that far. ``ledger`` is False for a replica's per-attempt record behind a gateway
    (analytics only: the gateway writes the billing record).
    """

    request_id: str
    idempotency_key: str
    time: datetime = field(validator=_utc)
    key_id: str | None
    tenant: str | None
    model: str
    replicas: tuple[str, ...] = ()
    prompt_tokens: int = field(default=0, validator=_non_negative)
    cached_tokens: int = field(default=0, validator=_non_negative)
    completion_tokens: int = field(default=0, validator=_non_negative)
    finish_reason: str | None = None
    http_status: int = 200
    queue_time: float | None = field(default=None, validator=_non_negative)
    ttft: float | None = field(default=None, validator=_non_negative)
    total_time: float = field(default=0.0, validator=_non_negative)
    final_chunk_sent: bool = False
    ledger: bool = True


@runtime_checkable
class UsageSink(Protocol):
    """Stores usage records durably; interface version 1.

    Contract: ``write(batch)`` returns only once every record of ``batch`` is committed
    (durable in the sink), and raises otherwise (the caller keeps the batch and retries);
    writing a record whose ``idempotency_key`` the sink already holds changes nothing, so a
    batch written twice is counted once; ``close()`` flushes and releases connections.

    Optional: ``write_rows(rows)``, the same contract for rows in the outbox's stored layout
    (:func:`servekit.usage.record_codec.stored_row`); a sink worker calls it instead of
    ``write`` when the sink has it, so no record is built per row (the SQLite sink does).
    """

    def write(self, batch: Sequence[UsageRecord]) -> None:
        """Commit ``batch`` (idempotent on each record's ``idempotency_key``)."""
        ...

    def close(self) -> None:
        """Flush and release the sink's resources."""
        ...


def make_usage_sink(sink: str | UsageSink) -> UsageSink:
    """A usage sink from a spec (a plugin's name, or ``'NAME:{...}'``) or an instance."""
    made = plugins.resolve("usage_sink", sink, what="usage_sink")
    if not isinstance(made, UsageSink):
        raise plugins.PluginTypeError(
            f"usage_sink must have write(batch) and close(), got {type(made).__name__}"
        )
    return made
