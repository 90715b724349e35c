"""The gateway's Prometheus metrics: per-replica outcomes, retries, failovers, routing
decisions, predicted vs reported cached prompt tokens and health (circuit-breaker state)."""

from __future__ import annotations

from collections.abc import Mapping

from servekit._optional import require

_STATES = ("up", "ejected", "probing", "down")


class GatewayMetrics:
    """Counters in a registry of their own (``render`` gives the exposition text)."""

    def __init__(self, prefix: str = "servekit_gateway_") -> None:
        prom = require("prometheus_client", "gateway")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self._outcomes = prom.Counter(f"{prefix}replica_responses", "Attempts per replica by "
                                      "outcome", ["replica", "outcome"], registry=self.registry)
        self._retries = prom.Counter(f"{prefix}retries", "Retries after a failed attempt",
                                     ["replica"], registry=self.registry)
        self._failovers = prom.Counter(f"{prefix}failovers", "Streams cut after their first "
                                       "byte on a replica, resumed elsewhere", ["replica"],
                                       registry=self.registry)
        self._routes = prom.Counter(f"{prefix}routing_decisions", "Routing decisions by "
                                    "replica and reason", ["replica", "reason"],
                                    registry=self.registry)
        self._predicted = prom.Counter(f"{prefix}predicted_cached_tokens", "Prompt tokens "
                                       "the KV-event index predicted cached on the replica a "
                                       "request went to", ["replica"], registry=self.registry)
        self._cached = prom.Counter(f"{prefix}cached_tokens", "Prompt tokens that replica "
                                    "reported cached, for the same requests", ["replica"],
                                    registry=self.registry)
        self._states = prom.Gauge(f"{prefix}replica_state", "Each replica's health (1 for "
                                  "its current state)", ["replica", "state"],
                                  registry=self.registry)

    def breaker(self, states: Mapping[str, str]) -> None:
        """Each replica's health now (``up``, ``ejected``: breaker open or half-open,
        ``probing``: its probe request in flight, ``down``: not ready); replicas not in
        ``states`` are dropped."""
        gauge = self._states
        gauge.clear()
        for replica, state in states.items():
            for name in _STATES:
                gauge.labels(replica, name).set(1.0 if name == state else 0.0)

    def cached(self, replica: str, predicted: int, actual: int) -> None:
        """A request on ``replica``: ``predicted`` cached prompt tokens, ``actual`` reported."""
        self._predicted.labels(replica).inc(predicted)
        self._cached.labels(replica).inc(actual)

    def failover(self, replica: str) -> None:
        """A stream cut on ``replica`` after its first byte was resumed elsewhere (or tried)."""
        self._failovers.labels(replica).inc()

    def outcome(self, replica: str, outcome: str) -> None:
        """An attempt on ``replica`` ended with ``outcome``."""
        self._outcomes.labels(replica, outcome).inc()

    def retry(self, replica: str) -> None:
        """A request that failed on ``replica`` was retried elsewhere."""
        self._retries.labels(replica).inc()

    def routed(self, replica: str, reason: str) -> None:
        """The router sent a request to ``replica`` for ``reason``."""
        self._routes.labels(replica, reason).inc()

    def render(self) -> bytes:
        """The exposition text."""
        return bytes(self._prom.generate_latest(self.registry))
