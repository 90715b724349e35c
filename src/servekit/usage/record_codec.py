"""One flat row layout for a :class:`UsageRecord`, shared by the outbox and every sink."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from servekit.usage.sink import UsageRecord

#: Column names in storage order; every sink stores these columns.
COLUMNS: tuple[str, ...] = (
    "idempotency_key", "request_id", "time", "key_id", "tenant", "model", "replicas",
    "prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason", "http_status",
    "queue_time", "ttft", "total_time", "final_chunk_sent", "ledger",
)
_TIME = COLUMNS.index("time")


def make_row(idempotency_key: str, request_id: str, time: Any, key_id: str | None,
             tenant: str | None, model: str, replicas: str, prompt_tokens: int,
             cached_tokens: int, completion_tokens: int, finish_reason: str | None,
             http_status: int, queue_time: float | None, ttft: float | None,
             total_time: float, final_chunk_sent: bool, ledger: bool) -> tuple[Any, ...]:
    """A row in :data:`COLUMNS` order from its values as given (``replicas`` joined by
    commas): the one place the layout is spelled out. The serving path builds its stored row
    with this directly, without a :class:`UsageRecord` (whose validators cost more than the
    row); its values come from the server's own counters."""
    return (idempotency_key, request_id, time, key_id, tenant, model, replicas, prompt_tokens,
            cached_tokens, completion_tokens, finish_reason, http_status, queue_time, ttft,
            total_time, final_chunk_sent, ledger)


def to_row(record: UsageRecord) -> tuple[Any, ...]:
    """The record as a tuple in :data:`COLUMNS` order (time as UTC datetime, replicas joined)."""
    return make_row(
        record.idempotency_key, record.request_id, record.time.astimezone(UTC), record.key_id,
        record.tenant, record.model, ",".join(record.replicas), record.prompt_tokens,
        record.cached_tokens, record.completion_tokens, record.finish_reason,
        record.http_status, record.queue_time, record.ttft, record.total_time,
        bool(record.final_chunk_sent), bool(record.ledger))


def stored_row(record: UsageRecord) -> tuple[Any, ...]:
    """:func:`to_row` with the time as an ISO-8601 UTC string: how SQLite (the outbox and the
    SQLite sink) stores a record, and what :meth:`Outbox.take` hands a sink's ``write_rows``."""
    row = to_row(record)
    return (*row[:_TIME], row[_TIME].isoformat(), *row[_TIME + 1:])


def from_row(row: tuple[Any, ...] | list[Any]) -> UsageRecord:
    """The record a :func:`to_row` tuple (or a sink's row in the same order) describes."""
    (idempotency_key, request_id, time, key_id, tenant, model, replicas, prompt_tokens,
     cached_tokens, completion_tokens, finish_reason, http_status, queue_time, ttft,
     total_time, final_chunk_sent, ledger) = row
    if isinstance(time, str):
        time = datetime.fromisoformat(time)
    if time.tzinfo is None:
        time = time.replace(tzinfo=UTC)
    return UsageRecord(
        idempotency_key=idempotency_key, request_id=request_id, time=time.astimezone(UTC),
        key_id=key_id or None, tenant=tenant or None, model=model,
        replicas=tuple(r for r in (replicas or "").split(",") if r),
        prompt_tokens=int(prompt_tokens), cached_tokens=int(cached_tokens),
        completion_tokens=int(completion_tokens), finish_reason=finish_reason or None,
        http_status=int(http_status), queue_time=_opt_float(queue_time),
        ttft=_opt_float(ttft), total_time=float(total_time),
        final_chunk_sent=bool(final_chunk_sent), ledger=bool(ledger),
    )


def first_per_key(batch: Sequence[UsageRecord]) -> list[UsageRecord]:
    """``batch`` without repeated idempotency keys (the first record of each key wins)."""
    seen: dict[str, UsageRecord] = {}
    for record in batch:
        seen.setdefault(record.idempotency_key, record)
    return list(seen.values())


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


#: What ``totals`` may group by.
GROUPS: tuple[str, ...] = ("tenant", "key_id", "model", "day")


def totals_sql(by: Sequence[str], day: str, count: str, where: str) -> str:
    """The totals query of one SQL dialect: requests and token sums of ledger records matching
    ``where``, grouped by ``by`` (``day`` is the dialect's expression for the UTC date)."""
    unknown = [b for b in by if b not in GROUPS]
    if unknown:
        raise ValueError(f"by: cannot group usage by {unknown}; choose from {GROUPS}")
    keys = [day if b == "day" else b for b in by]
    tail = f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else \
        f"HAVING {count} > 0"
    return (f"SELECT {''.join(k + ', ' for k in keys)}{count}, sum(prompt_tokens), "
            f"sum(cached_tokens), sum(completion_tokens) FROM usage WHERE {where} {tail}")
