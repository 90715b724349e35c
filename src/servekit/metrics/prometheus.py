"""Prometheus exporter with vLLM's metric vocabulary (``servekit[prometheus]``).

Two naming styles: ``"prometheus"`` (the default, prefix ``servekit_``) follows Prometheus'
conventions and passes ``promtool check metrics``; ``"vllm"`` (prefix ``vllm:``) keeps vLLM's
exact names (colons, the ``iteration_tokens_total`` histogram) for dashboards built for vLLM.

:class:`PrometheusHook` records events into plain Python counters and bucket arrays (one
``bisect`` and two additions per token event, no locks, no ``prometheus_client`` call) and
turns them into metric families only when scraped, through a collector registered on its own
``CollectorRegistry``. Per-request metrics carry ``model_name`` and ``tenant`` labels; engine-wide
ones carry ``model_name``. Bucket boundaries are vLLM's.

Events are expected from one thread at a time (the engine loop); a scrape from another thread
reads a consistent-enough snapshot (a histogram's sum may lag its buckets by one observation).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from servekit._optional import require
from servekit.metrics.errors import MetricsConfigError
from servekit.metrics.events import (
    KV_BLOCKS_IN_USE,
    OPEN_STREAMS,
    RATE_LIMIT_RESERVATIONS,
    RATE_LIMIT_STORE_ERRORS,
    CacheStats,
    EngineStep,
    FirstToken,
    NewTokens,
    RateLimitDecision,
    RequestFinished,
    RequestPreempted,
    RequestScheduled,
    ResourceGauge,
    RouteDecision,
)
from servekit.metrics.hooks import Hook
from servekit.metrics.stats import (
    OVERFLOW_TENANT,
    CumulativeDelta,
    kv_event_kind,
    time_per_output_token,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

#: vLLM's buckets for time to first token, seconds.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
#: vLLM's buckets for inter-token latency and time per output token, seconds.
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
#: vLLM's buckets for request-level latencies (end to end, queue), seconds.
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
#: Buckets for tokens scheduled per engine step (vLLM's ``iteration_tokens_total``).
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip

_PREFIX_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)?$")
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEAK_GAUGES = {
    KV_BLOCKS_IN_USE: "KV cache blocks held by live requests.",
    RATE_LIMIT_RESERVATIONS: "Rate-limit reservations not settled yet.",
    OPEN_STREAMS: "Response streams open to clients.",
}
#: Resource events that carry a running total: exported as counters.
_RESOURCE_COUNTERS = {
    RATE_LIMIT_STORE_ERRORS: "Rate-limit decisions the limiter store could not make (outages).",
}
#: Metric naming styles: the default prefix and the iteration-tokens histogram's name.
MetricsStyle = Literal["prometheus", "vllm"]
_STYLES: dict[str, tuple[str, str]] = {
    "prometheus": ("servekit_", "iteration_tokens"),
    "vllm": ("vllm:", "iteration_tokens_total"),
}


class _Buckets:
    """Non-cumulative bucket counts (the last is +Inf) and a sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, bounds: Sequence[float], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1
        self.sum += value


class _Series:
    """Everything recorded for one tenant."""

    __slots__ = (
        "e2e", "generation_tokens", "itl", "preemptions", "prompt_tokens", "queue",
        "rate_limit", "success", "tenant", "tpot", "ttft",
    )  # fmt: skip

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.ttft = _Buckets(TTFT_BUCKETS)
        self.itl = _Buckets(ITL_BUCKETS)
        self.queue = _Buckets(REQUEST_LATENCY_BUCKETS)
        self.e2e = _Buckets(REQUEST_LATENCY_BUCKETS)
        self.tpot = _Buckets(ITL_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.success: dict[str, int] = {}
        self.rate_limit: dict[tuple[str, str], int] = {}


class PrometheusHook(Hook):
    """Publishes events as Prometheus metrics named like vLLM's, under ``prefix``.

    ``style`` picks the naming: ``"prometheus"`` (default prefix ``servekit_``, Prometheus'
    conventions) or ``"vllm"`` (default prefix ``vllm:``, vLLM's exact names); ``prefix``
    overrides the style's prefix. ``registry`` defaults to a fresh ``CollectorRegistry`` (no
    global state); pass ``prometheus_client.REGISTRY`` to share the process-wide one. ``max_tenants`` bounds the
    ``tenant`` label's values: later tenants are counted under ``"__other__"``.
    """

    def __init__(
        self,
        model_name: str,
        *,
        prefix: str | None = None,
        style: MetricsStyle = "prometheus",
        registry: CollectorRegistry | None = None,
        max_tenants: int = 1000,
    ) -> None:
        require("prometheus_client", "prometheus")
        from prometheus_client import CollectorRegistry

        if not isinstance(model_name, str) or not model_name:
            raise MetricsConfigError("model_name", f"must be a non-empty str, got {model_name!r}")
        if style not in _STYLES:
            raise MetricsConfigError("style", f"must be one of {sorted(_STYLES)}, got {style!r}")
        if prefix is None:
            prefix = _STYLES[style][0]
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise MetricsConfigError(
                "prefix", f"must match [a-zA-Z_:][a-zA-Z0-9_:]* or be empty, got {prefix!r}"
            )
        if max_tenants < 1:
            raise MetricsConfigError("max_tenants", f"must be >= 1, got {max_tenants!r}")
        self.model_name = model_name
        self.prefix = prefix
        self.style = style
        self.max_tenants = max_tenants
        self._series: dict[str | None, _Series] = {}
        self._overflow: _Series | None = None
        self._running = 0.0
        self._waiting = 0.0
        self._kv_usage = 0.0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._prefix_queries_delta = CumulativeDelta()
        self._prefix_hits_delta = CumulativeDelta()
        self._iteration_tokens = _Buckets(ITERATION_TOKENS_BUCKETS)
        self._kv_blocks: dict[str, int] = {"stored": 0, "removed": 0, "cleared": 0}
        self._routes: dict[tuple[str, str], int] = {}
        self._resources: dict[str, float] = dict.fromkeys(_LEAK_GAUGES, 0.0)
        self._resource_counters: dict[str, float] = dict.fromkeys(_RESOURCE_COUNTERS, 0.0)
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_Collector(self))  # type: ignore[arg-type]

    # -- serving ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app that serves the registry (mount it at ``/metrics``)."""
        from prometheus_client import make_asgi_app

        return make_asgi_app(self.registry)

    def set_resource(self, name: str, value: float) -> None:
        """Set a resource gauge directly (what :meth:`on_resource_gauge` does per event)."""
        if name in self._resource_counters:
            self._resource_counters[name] = float(value)
            return
        if name not in self._resources and not _NAME_RE.match(self.prefix + name):
            raise MetricsConfigError("name", f"not a valid metric name: {name!r}")
        self._resources[name] = float(value)

    # -- recording -------------------------------------------------------------------------

    def _new_series(self, tenant: str | None) -> _Series:
        if len(self._series) < self.max_tenants:
            series = self._series[tenant] = _Series(tenant or "")
            return series
        if self._overflow is None:
            self._overflow = _Series(OVERFLOW_TENANT)
        return self._overflow

    def on_request_scheduled(self, event: RequestScheduled) -> None:
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        s.queue.observe(REQUEST_LATENCY_BUCKETS, event.time - event.arrival_time)

    def on_request_preempted(self, event: RequestPreempted) -> None:
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        s.preemptions += 1

    def on_first_token(self, event: FirstToken) -> None:
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        s.generation_tokens += 1
        s.ttft.observe(TTFT_BUCKETS, event.time - event.arrival_time)

    def on_new_tokens(self, event: NewTokens) -> None:
        # The hot path: one bucket update per event, weighted by num_tokens (each of the n
        # tokens is observed at the step's mean latency; their sum is the step's duration).
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        n = event.num_tokens
        if n > 0:
            elapsed = event.time - event.previous_time
            itl = s.itl
            itl.counts[bisect_left(ITL_BUCKETS, elapsed / n)] += n
            itl.sum += elapsed
            s.generation_tokens += n

    def on_request_finished(self, event: RequestFinished) -> None:
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        s.prompt_tokens += event.prompt_tokens
        s.success[event.reason] = s.success.get(event.reason, 0) + 1
        s.e2e.observe(REQUEST_LATENCY_BUCKETS, event.time - event.arrival_time)
        tpot = time_per_output_token(event)
        if tpot is not None:
            s.tpot.observe(ITL_BUCKETS, tpot)

    def on_engine_step(self, event: EngineStep) -> None:
        self._running = event.num_running
        self._waiting = event.num_waiting
        self._iteration_tokens.observe(ITERATION_TOKENS_BUCKETS, event.scheduled_tokens)

    def on_cache_stats(self, event: CacheStats) -> None:
        self._kv_usage = event.usage
        self._prefix_queries += self._prefix_queries_delta.delta(event.prefix_queries)
        self._prefix_hits += self._prefix_hits_delta.delta(event.prefix_hits)

    def on_kv_event(self, event: Any) -> None:
        kind = kv_event_kind(event)
        if kind == "cleared":
            self._kv_blocks["cleared"] += 1
        elif kind is not None:
            self._kv_blocks[kind] += len(event.block_hashes)

    def on_rate_limit(self, event: RateLimitDecision) -> None:
        s = self._series.get(event.tenant) or self._new_series(event.tenant)
        key = ("allowed" if event.allowed else "rejected", "true" if event.shadow else "false")
        s.rate_limit[key] = s.rate_limit.get(key, 0) + 1

    def on_route(self, event: RouteDecision) -> None:
        key = (event.node, "true" if event.fallback else "false")
        self._routes[key] = self._routes.get(key, 0) + 1

    def on_resource_gauge(self, event: ResourceGauge) -> None:
        self.set_resource(event.name, event.value)

    # -- scraping --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the recorded values (called by the registry)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p, model = self.prefix, self.model_name
        series = list(self._series.values())
        if self._overflow is not None:
            series.append(self._overflow)
        req = ["model_name", "tenant"]

        histograms = (
            ("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS, "ttft"),
            ("inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS, "itl"),
            ("request_queue_time_seconds", "Time spent waiting before first scheduled.",
             REQUEST_LATENCY_BUCKETS, "queue"),
            ("e2e_request_latency_seconds", "End-to-end request latency.",
             REQUEST_LATENCY_BUCKETS, "e2e"),
            ("request_time_per_output_token_seconds",
             "Mean time per output token after the first, per request.", ITL_BUCKETS, "tpot"),
        )  # fmt: skip
        for name, doc, bounds, attr in histograms:
            fam = HistogramMetricFamily(p + name, doc, labels=req)
            for s in series:
                b: _Buckets = getattr(s, attr)
                fam.add_metric([model, s.tenant], _cumulative(bounds, b.counts), b.sum)
            yield fam

        counters = (
            ("prompt_tokens", "Prompt tokens of finished requests.", "prompt_tokens"),
            ("generation_tokens", "Generated tokens.", "generation_tokens"),
            ("num_preemptions", "Preemptions of running requests.", "preemptions"),
        )
        for name, doc, attr in counters:
            cfam = CounterMetricFamily(p + name, doc, labels=req)
            for s in series:
                cfam.add_metric([model, s.tenant], getattr(s, attr))
            yield cfam

        cfam = CounterMetricFamily(
            p + "request_success", "Finished requests by finish reason.",
            labels=[*req, "finished_reason"],
        )  # fmt: skip
        for s in series:
            for reason, n in list(s.success.items()):
                cfam.add_metric([model, s.tenant, reason], n)
        yield cfam

        cfam = CounterMetricFamily(
            p + "rate_limit_decisions", "Rate-limit decisions.",
            labels=[*req, "decision", "shadow"],
        )  # fmt: skip
        for s in series:
            for (decision, shadow), n in list(s.rate_limit.items()):
                cfam.add_metric([model, s.tenant, decision, shadow], n)
        yield cfam

        eng = ["model_name"]
        for name, doc, value in (
            ("num_requests_running", "Requests in the running batch.", self._running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", self._waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
             self._kv_usage),
        ):  # fmt: skip
            gfam = GaugeMetricFamily(p + name, doc, labels=eng)
            gfam.add_metric([model], value)
            yield gfam
        for name, value in list(self._resources.items()):
            doc = _LEAK_GAUGES.get(name, f"Resource gauge {name}.")
            gfam = GaugeMetricFamily(p + name, doc, labels=eng)
            gfam.add_metric([model], value)
            yield gfam
        for name, cvalue in list(self._resource_counters.items()):
            cfam = CounterMetricFamily(p + name, _RESOURCE_COUNTERS[name], labels=eng)
            cfam.add_metric([model], cvalue)
            yield cfam

        for name, doc, cvalue in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             self._prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", self._prefix_hits),
            ("kv_blocks_stored", "KV blocks registered in the prefix cache.",
             self._kv_blocks["stored"]),
            ("kv_blocks_removed", "KV blocks evicted from the prefix cache.",
             self._kv_blocks["removed"]),
            ("kv_cache_resets", "Prefix cache resets.", self._kv_blocks["cleared"]),
        ):  # fmt: skip
            cfam = CounterMetricFamily(p + name, doc, labels=eng)
            cfam.add_metric([model], cvalue)
            yield cfam

        fam = HistogramMetricFamily(
            p + _STYLES[self.style][1], "Tokens scheduled per engine step.", labels=eng
        )
        it = self._iteration_tokens
        fam.add_metric([model], _cumulative(ITERATION_TOKENS_BUCKETS, it.counts), it.sum)
        yield fam

        cfam = CounterMetricFamily(
            p + "route_decisions", "Routing decisions by chosen node.",
            labels=[*eng, "node", "fallback"],
        )  # fmt: skip
        for (node, fallback), n in list(self._routes.items()):
            cfam.add_metric([model, node, fallback], n)
        yield cfam


def _cumulative(bounds: Sequence[float], counts: list[int]) -> list[tuple[str, float]]:
    snapshot = list(counts)
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, snapshot[:-1], strict=True):
        total += n
        out.append((_le(bound), total))
    out.append(("+Inf", total + snapshot[-1]))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


class _Collector:
    """Adapts a :class:`PrometheusHook` to the registry's collector protocol."""

    __slots__ = ("_hook",)

    def __init__(self, hook: PrometheusHook) -> None:
        self._hook = hook

    def collect(self) -> Iterator[Metric]:
        return self._hook.collect()

    def describe(self) -> list[Metric]:
        return list(self._hook.collect())
