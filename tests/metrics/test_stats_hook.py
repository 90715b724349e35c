"""StatsHook: the right values from events on a fake clock; exact weighted percentiles."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.metrics import HookSet, StatsHook
from servekit.metrics.events import (
    OPEN_STREAMS,
    CacheStats,
    RateLimitDecision,
    ResourceGauge,
    RouteDecision,
)
from servekit.metrics.stats import CumulativeDelta, Histogram

Lifecycle = Callable[..., None]


def test_lifecycle_values(lifecycle: Lifecycle) -> None:
    stats = StatsHook()
    lifecycle(HookSet([stats]))
    assert stats.histogram("time_to_first_token_seconds").summary()["p50"] == pytest.approx(1.0)
    assert stats.histogram("request_queue_time_seconds").mean == pytest.approx(0.5)
    assert stats.histogram("e2e_request_latency_seconds").mean == pytest.approx(1.5)
    itl = stats.histogram("inter_token_latency_seconds")
    assert itl.count == 3  # one per token after the first
    assert itl.mean == pytest.approx(0.1)
    assert [w for _, w in itl] == [1, 2]  # the 2-token step is one weighted observation
    tpot = stats.histogram("request_time_per_output_token_seconds")
    assert tpot.mean == pytest.approx(0.5 / 3)
    assert stats.counter("num_preemptions") == 1
    assert stats.counter("generation_tokens") == 4
    assert stats.counter("prompt_tokens") == 12
    assert stats.counter("cached_prompt_tokens") == 4
    assert stats.prefix_cache_hit_rate == pytest.approx(4 / 16)
    assert stats.gauge("num_requests_running") == 1
    assert stats.gauge("kv_cache_usage_perc") == 0.5
    assert stats.finish_reasons == {"stop": 1}
    assert stats.open_requests == set()


def test_per_tenant_and_total(lifecycle: Lifecycle) -> None:
    stats = StatsHook()
    lifecycle(stats, "a", "alpha")
    lifecycle(stats, "b", "beta")
    lifecycle(stats, "c", None)
    assert stats.counter("generation_tokens") == 12
    assert stats.counter("generation_tokens", "alpha") == 4
    assert stats.counter("generation_tokens", None) == 4
    assert stats.counter("generation_tokens", "nobody") == 0
    assert stats.histogram("time_to_first_token_seconds", "beta").count == 1
    assert stats.histogram("time_to_first_token_seconds").count == 3
    assert stats.finish_reasons == {"stop": 3}


def test_prefix_counters_are_cumulative_and_survive_a_producer_restart() -> None:
    stats = StatsHook()
    assert math.isnan(stats.prefix_cache_hit_rate)
    for queries, hits in [(100, 25), (200, 75), (40, 40)]:  # the last one: a restart
        stats.on_cache_stats(CacheStats(0.1, queries, hits, 0.0))
    assert stats.counter("prefix_cache_queries") == 240
    assert stats.counter("prefix_cache_hits") == 115


def test_rate_limit_routes_gauges_kv_events_and_reset() -> None:
    stats = StatsHook()
    stats.on_rate_limit(RateLimitDecision("k", True, 0.0, False, 0.0, tenant="t"))
    stats.on_rate_limit(RateLimitDecision("k", False, 1.0, False, 0.0, tenant="t"))
    stats.on_rate_limit(RateLimitDecision("k", False, 1.0, True, 0.0))
    stats.on_route(RouteDecision("key", "n1", 0, 0.0))
    stats.on_route(RouteDecision("key", "n2", 1, 0.0))
    stats.on_resource_gauge(ResourceGauge(OPEN_STREAMS, 3, 0.0))

    class BlockStored:
        block_hashes = (1, 2, 3)

    class BlockRemoved:
        block_hashes = (1,)

    class AllBlocksCleared:
        pass

    for event in (BlockStored(), BlockRemoved(), AllBlocksCleared(), object()):
        stats.on_kv_event(event)
    snap = stats.snapshot()["counters"]
    assert snap["rate_limit_allowed"] == 1 and snap["rate_limit_rejected"] == 1
    assert snap["rate_limit_shadow_rejected"] == 1
    assert stats.counter("rate_limit_rejected", "t") == 1
    assert snap["route_decisions"] == 2 and snap["route_fallbacks"] == 1
    assert stats.route_nodes == {"n1": 1, "n2": 1}
    assert stats.gauge(OPEN_STREAMS) == 3
    assert (snap["kv_blocks_stored"], snap["kv_blocks_removed"], snap["kv_cache_cleared"]) == (
        3,
        1,
        1,
    )
    stats.reset()
    assert stats.snapshot()["counters"] == {} and stats.gauge(OPEN_STREAMS) == 0


def test_histogram_edges() -> None:
    h = Histogram()
    assert math.isnan(h.percentile(50)) and math.isnan(h.mean) and math.isnan(h.min)
    h.observe(2.0, 0)  # zero weight: ignored
    assert h.count == 0
    h.observe(3.0)
    h.observe(1.0, 3)
    assert (h.percentile(0), h.percentile(75), h.percentile(76), h.percentile(100)) == (1, 1, 3, 3)
    assert (h.min, h.max, h.count, h.total) == (1.0, 3.0, 4, 6.0)
    with pytest.raises(ValueError, match="q must be"):
        h.percentile(101)


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.floats(-1e6, 1e6), st.integers(1, 5)), min_size=1, max_size=30),
    st.floats(0, 100),
)
def test_weighted_percentile_matches_expanded_nearest_rank(
    samples: list[tuple[float, int]], q: float
) -> None:
    h = Histogram()
    for value, weight in samples:
        h.observe(value, weight)
    expanded = sorted(v for v, w in samples for _ in range(w))
    rank = max(1, math.ceil(q / 100 * len(expanded)))
    assert h.percentile(q) == expanded[rank - 1]
    assert h.count == len(expanded)


@given(st.lists(st.integers(0, 1000), max_size=20))
def test_cumulative_delta_sums_to_total_without_restarts(values: list[int]) -> None:
    running = sorted(values)  # a producer that never restarts only grows
    delta = CumulativeDelta()
    assert sum(delta.delta(v) for v in running) == (running[-1] if running else 0)
