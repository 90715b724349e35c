"""In-process statistics: exact counters, gauges and histograms with percentiles.

:class:`StatsHook` turns events into the same quantities the exporters publish (TTFT,
inter-token latency, queue time, end-to-end latency, preemptions, prefix hit rate, ...), kept
exactly in memory so tests and benchmarks can assert on them. Histograms keep every sample
(weighted), so memory grows with the number of events: use an exporter in production.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from typing import Any

from servekit.metrics.events import (
    CacheStats,
    EngineStep,
    FirstToken,
    NewTokens,
    RateLimitDecision,
    RequestFinished,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
    ResourceGauge,
    RouteDecision,
)
from servekit.metrics.hooks import Hook

#: Pass as ``tenant`` to read a value summed over every tenant (the default).
ALL = object()
#: Label value exporters use for tenants beyond their ``max_tenants`` (bounds cardinality).
OVERFLOW_TENANT = "__other__"


class Histogram:
    """Exact weighted samples; percentiles by the nearest-rank rule on the weights."""

    __slots__ = ("_order", "_values", "_weights", "count", "total")

    def __init__(self) -> None:
        self._values = array("d")
        self._weights = array("q")
        self._order: list[int] | None = None
        #: number of observations (sum of weights).
        self.count = 0
        #: sum of the observed values, each times its weight.
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``value`` ``count`` times."""
        if count <= 0:
            return
        self._values.append(value)
        self._weights.append(count)
        self.count += count
        self.total += value * count
        self._order = None

    def __iter__(self) -> Iterator[tuple[float, int]]:
        """The ``(value, count)`` observations, in arrival order."""
        return zip(self._values, self._weights, strict=True)

    @property
    def mean(self) -> float:
        """Mean of the observations (NaN when empty)."""
        return self.total / self.count if self.count else math.nan

    @property
    def min(self) -> float:
        """Smallest observation (NaN when empty)."""
        return min(self._values) if self._values else math.nan

    @property
    def max(self) -> float:
        """Largest observation (NaN when empty)."""
        return max(self._values) if self._values else math.nan

    def percentile(self, q: float) -> float:
        """The smallest value with at least ``q`` percent of the weight at or below it.

        ``q`` is in [0, 100]; NaN when the histogram is empty.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"q must be in [0, 100], got {q!r}")
        if not self.count:
            return math.nan
        values = self._values
        if self._order is None:
            self._order = sorted(range(len(values)), key=values.__getitem__)
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for i in self._order:
            seen += self._weights[i]
            if seen >= rank:
                return values[i]
        return values[self._order[-1]]  # pragma: no cover - rank <= count always stops above

    def summary(self) -> dict[str, float]:
        """count, mean, min, p50, p90, p99, max as plain data."""
        return {
            "count": float(self.count),
            "mean": self.mean,
            "min": self.min,
            "p50": self.percentile(50),
            "p90": self.percentile(90),
            "p99": self.percentile(99),
            "max": self.max,
        }


class CumulativeDelta:
    """Turns a cumulative counter reported by a producer into increments.

    A value lower than the last one means the producer restarted: its new value is the
    increment.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def delta(self, value: int) -> int:
        """The increment since the last reported ``value``."""
        last = self.last
        self.last = value
        return value - last if value >= last else value


class StatsHook(Hook):
    """Counts and measures every event in memory, in total and per tenant.

    Counters: ``requests_queued``, ``requests_scheduled``, ``requests_finished``,
    ``num_preemptions``, ``prompt_tokens`` (at finish), ``generation_tokens``,
    ``cached_prompt_tokens``, ``prefix_cache_queries``, ``prefix_cache_hits``, ``engine_steps``,
    ``rate_limit_allowed``, ``rate_limit_rejected``, ``rate_limit_shadow_rejected``,
    ``route_decisions``, ``route_fallbacks``, ``kv_blocks_stored``, ``kv_blocks_removed``,
    ``kv_cache_cleared``. Histograms (seconds): ``time_to_first_token_seconds``,
    ``inter_token_latency_seconds``, ``request_queue_time_seconds``,
    ``e2e_request_latency_seconds``, ``request_time_per_output_token_seconds``,
    ``engine_step_duration_seconds``. Gauges: ``num_requests_running``,
    ``num_requests_waiting``, ``kv_cache_usage_perc`` and every :class:`ResourceGauge` name.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._counters: dict[tuple[str, object], float] = {}
        self._histograms: dict[tuple[str, object], Histogram] = {}
        self._gauges: dict[str, float] = {}
        #: finished requests per finish reason.
        self.finish_reasons: dict[str, int] = {}
        #: routing decisions per node.
        self.route_nodes: dict[str, int] = {}
        #: ids of requests queued and not finished yet.
        self.open_requests: set[str] = set()
        self._prefix_queries = CumulativeDelta()
        self._prefix_hits = CumulativeDelta()

    # -- reading -------------------------------------------------------------------------

    def counter(self, name: str, tenant: object = ALL) -> float:
        """Counter ``name``, over all tenants or for one (``None`` is the no-tenant bucket)."""
        return self._counters.get((name, tenant), 0.0)

    def histogram(self, name: str, tenant: object = ALL) -> Histogram:
        """Histogram ``name`` (an empty one when nothing was observed)."""
        return self._histograms.get((name, tenant)) or Histogram()

    def gauge(self, name: str) -> float:
        """Last value of gauge ``name`` (0.0 when never set)."""
        return self._gauges.get(name, 0.0)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix-cache hit tokens over queried tokens (NaN before any query)."""
        queries = self.counter("prefix_cache_queries")
        return self.counter("prefix_cache_hits") / queries if queries else math.nan

    def snapshot(self) -> dict[str, Any]:
        """Everything recorded, over all tenants, as JSON-ready plain data."""
        counters = {n: v for (n, t), v in self._counters.items() if t is ALL}
        hists = {n: h for (n, t), h in self._histograms.items() if t is ALL}
        return {
            "counters": dict(sorted(counters.items())),
            "gauges": dict(sorted(self._gauges.items())),
            "histograms": {n: hists[n].summary() for n in sorted(hists)},
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
        }

    # -- recording -----------------------------------------------------------------------

    def _inc(self, name: str, tenant: str | None, value: float = 1) -> None:
        counters = self._counters
        counters[name, ALL] = counters.get((name, ALL), 0.0) + value
        counters[name, tenant] = counters.get((name, tenant), 0.0) + value

    def _observe(self, name: str, tenant: str | None, value: float, count: int = 1) -> None:
        for key in ((name, ALL), (name, tenant)):
            hist = self._histograms.get(key)
            if hist is None:
                hist = self._histograms[key] = Histogram()
            hist.observe(value, count)

    def on_request_queued(self, event: RequestQueued) -> None:
        self.open_requests.add(event.request_id)
        self._inc("requests_queued", event.tenant)

    def on_request_scheduled(self, event: RequestScheduled) -> None:
        self._inc("requests_scheduled", event.tenant)
        self._observe("request_queue_time_seconds", event.tenant, event.time - event.arrival_time)

    def on_request_preempted(self, event: RequestPreempted) -> None:
        self._inc("num_preemptions", event.tenant)

    def on_first_token(self, event: FirstToken) -> None:
        self._inc("generation_tokens", event.tenant)
        self._observe("time_to_first_token_seconds", event.tenant, event.time - event.arrival_time)

    def on_new_tokens(self, event: NewTokens) -> None:
        n = event.num_tokens
        if n <= 0:
            return
        self._inc("generation_tokens", event.tenant, n)
        itl = (event.time - event.previous_time) / n
        self._observe("inter_token_latency_seconds", event.tenant, itl, n)

    def on_request_finished(self, event: RequestFinished) -> None:
        tenant = event.tenant
        self.open_requests.discard(event.request_id)
        self.finish_reasons[event.reason] = self.finish_reasons.get(event.reason, 0) + 1
        self._inc("requests_finished", tenant)
        self._inc("prompt_tokens", tenant, event.prompt_tokens)
        self._inc("cached_prompt_tokens", tenant, event.cached_prompt_tokens)
        self._observe("e2e_request_latency_seconds", tenant, event.time - event.arrival_time)
        tpot = time_per_output_token(event)
        if tpot is not None:
            self._observe("request_time_per_output_token_seconds", tenant, tpot)

    def on_engine_step(self, event: EngineStep) -> None:
        self._inc("engine_steps", None)
        self._gauges["num_requests_running"] = event.num_running
        self._gauges["num_requests_waiting"] = event.num_waiting
        self._observe("engine_step_duration_seconds", None, event.duration)

    def on_cache_stats(self, event: CacheStats) -> None:
        self._gauges["kv_cache_usage_perc"] = event.usage
        self._inc("prefix_cache_queries", None, self._prefix_queries.delta(event.prefix_queries))
        self._inc("prefix_cache_hits", None, self._prefix_hits.delta(event.prefix_hits))

    def on_kv_event(self, event: Any) -> None:
        kind = kv_event_kind(event)
        if kind == "stored":
            self._inc("kv_blocks_stored", None, len(event.block_hashes))
        elif kind == "removed":
            self._inc("kv_blocks_removed", None, len(event.block_hashes))
        elif kind == "cleared":
            self._inc("kv_cache_cleared", None)

    def on_rate_limit(self, event: RateLimitDecision) -> None:
        if event.allowed:
            name = "rate_limit_allowed"
        else:
            name = "rate_limit_shadow_rejected" if event.shadow else "rate_limit_rejected"
        self._inc(name, event.tenant)

    def on_route(self, event: RouteDecision) -> None:
        self._inc("route_decisions", None)
        if event.fallback:
            self._inc("route_fallbacks", None)
        self.route_nodes[event.node] = self.route_nodes.get(event.node, 0) + 1

    def on_resource_gauge(self, event: ResourceGauge) -> None:
        self._gauges[event.name] = event.value


def time_per_output_token(event: RequestFinished) -> float | None:
    """Mean time per output token after the first, or None with fewer than two tokens."""
    if event.first_token_time is None or event.output_tokens < 2:
        return None
    return (event.time - event.first_token_time) / (event.output_tokens - 1)


_KV_KINDS = {"BlockStored": "stored", "BlockRemoved": "removed", "AllBlocksCleared": "cleared"}


def kv_event_kind(event: object) -> str | None:
    """``"stored"``, ``"removed"``, ``"cleared"`` for ``servekit.kv.events``, else None.

    Matched by class name so ``metrics`` does not import ``kv``.
    """
    return _KV_KINDS.get(type(event).__name__)
