"""What the ingress adds to the server's ``/metrics``: failovers, and each engine replica's load.

The ingress runs the server's own ``/metrics`` (its requests, tokens, limits, usage), but its
engine gauges would stay at zero: the engines run in the replicas. :class:`IngressCollector`,
registered in the server's registry, adds

- ``servekit_ray_failovers_total{reason}``: streams resumed on another replica after theirs
  was lost (:func:`~servekit.deploy.ray.proxy.failover_reason`);
- per engine replica (``replica`` label, Ray's replica id), from the routing stats the replicas
  report to this process's request router every ``ray.routing_stats_period`` s:
  ``servekit_ray_replica_num_requests_running``, ``..._num_requests_waiting``,
  ``..._kv_cache_usage_perc``, ``..._router_in_flight`` (this process's router's own count)
  (gauges) and ``servekit_ray_replica_requests_total``,
  ``..._prefix_cache_queries_total``, ``..._prefix_cache_hits_total`` (prompt tokens; counters
  of that replica's life). With Ray's default router (``routing_policy = "ray"``) nobody reads
  the reports in this process, and only the failovers are shown.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["PREFIX", "IngressCollector", "register_router", "replica_reports"]

PREFIX = "servekit_ray_"

#: (report key, metric name, help, is a counter)
_REPLICA_SERIES = (
    ("running", "replica_num_requests_running", "Requests in the replica's running batch.",
     False),
    ("waiting", "replica_num_requests_waiting", "Requests waiting in the replica's queue.",
     False),
    ("kv_usage", "replica_kv_cache_usage_perc",
     "Fraction of the replica's KV cache blocks in use (1 = full).", False),
    ("router_in_flight", "replica_router_in_flight",
     "Requests this ingress's router sent to the replica that have not completed.", False),
    ("requests", "replica_requests", "Requests the replica was sent.", True),
    ("prefix_queries", "replica_prefix_cache_queries",
     "Prompt tokens the replica looked up in its prefix cache.", True),
    ("prefix_hits", "replica_prefix_cache_hits",
     "Prompt tokens the replica found in its prefix cache.", True),
)


class _Reporting(Protocol):
    @property
    def app_name(self) -> str: ...

    def replica_reports(self) -> dict[str, dict[str, Any]]: ...


_ROUTERS: weakref.WeakSet[Any] = weakref.WeakSet()


def register_router(router: _Reporting) -> None:
    """List ``router`` (a :class:`~servekit.deploy.ray.router.ServekitRequestRouter`, which
    registers itself) for :func:`replica_reports`."""
    _ROUTERS.add(router)


def replica_reports(app_name: str) -> dict[str, dict[str, Any]]:
    """Each replica's last routing stats as the servekit routers of this process hold them
    (those routing calls to application ``app_name``), by replica id."""
    routers: list[_Reporting] = [r for r in list(_ROUTERS) if r.app_name == app_name]
    return {name: stats for r in routers for name, stats in r.replica_reports().items()}


class IngressCollector:
    """A Prometheus collector: ``failovers()`` gives the failover counts by reason, ``reports()``
    each replica's last routing stats by replica id (both read at each scrape)."""

    def __init__(self, failovers: Callable[[], Mapping[str, int]],
                 reports: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self._failovers = failovers
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        """The metric families, from the current counts and reports."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fam = CounterMetricFamily(PREFIX + "failovers", "Streams resumed on another replica "
                                  "after theirs was lost, by how Ray reported the loss.",
                                  labels=["reason"])
        for reason, n in sorted(self._failovers().items()):
            fam.add_metric([reason], n)
        yield fam
        reports = self._reports()
        for key, name, doc, counter in _REPLICA_SERIES:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            rfam = family(PREFIX + name, doc, labels=["replica"])
            for replica, stats in sorted(reports.items()):
                if key in stats:
                    rfam.add_metric([replica], float(stats[key]))
            yield rfam

    def describe(self) -> list[Metric]:
        """No fixed description: collected at each scrape."""
        return []
