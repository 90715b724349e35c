"""The ingress's own /metrics series (no cluster): failovers by reason, and each replica's
reported load as gauges and its counters, read at each scrape."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from servekit.deploy.ray.metrics import (  # noqa: E402
    IngressCollector,
    register_router,
    replica_reports,
)


def scrape(failovers: Counter[str], reports: dict[str, dict[str, Any]]) -> str:
    registry = CollectorRegistry()
    registry.register(IngressCollector(lambda: failovers, lambda: reports))
    return generate_latest(registry).decode()


def test_failovers_and_replica_series_follow_their_sources_at_each_scrape() -> None:
    failovers: Counter[str] = Counter()
    reports: dict[str, dict[str, Any]] = {
        "a": {"running": 3, "waiting": 1, "kv_usage": 0.5, "requests": 10,
              "prefix_queries": 800, "prefix_hits": 640},
        "b": {},  # not reported yet: no samples
    }
    text = scrape(failovers, reports)
    assert "servekit_ray_failovers_total{" not in text
    assert 'servekit_ray_replica_num_requests_running{replica="a"} 3.0' in text
    assert 'servekit_ray_replica_num_requests_waiting{replica="a"} 1.0' in text
    assert 'servekit_ray_replica_kv_cache_usage_perc{replica="a"} 0.5' in text
    assert 'servekit_ray_replica_requests_total{replica="a"} 10.0' in text
    assert 'servekit_ray_replica_prefix_cache_hits_total{replica="a"} 640.0' in text
    assert 'servekit_ray_replica_prefix_cache_queries_total{replica="a"} 800.0' in text
    assert 'replica="b"' not in text
    failovers["actor_died"] += 2
    reports["a"]["running"] = 0
    text = scrape(failovers, reports)
    assert 'servekit_ray_failovers_total{reason="actor_died"} 2.0' in text
    assert 'servekit_ray_replica_num_requests_running{replica="a"} 0.0' in text


class FakeRouter:
    def __init__(self, app_name: str, reports: dict[str, dict[str, Any]]) -> None:
        self.app_name = app_name
        self._reports = reports

    def replica_reports(self) -> dict[str, dict[str, Any]]:
        return self._reports


def test_reports_come_from_the_routers_of_the_application() -> None:
    mine = FakeRouter("app-1", {"r1": {"running": 1}})
    other = FakeRouter("app-2", {"r9": {"running": 5}})
    register_router(mine)
    register_router(other)
    assert replica_reports("app-1") == {"r1": {"running": 1}}
    del mine  # a router that is gone (its handle dropped) is forgotten
    assert replica_reports("app-1") == {}
    assert replica_reports("app-2") == {"r9": {"running": 5}}
