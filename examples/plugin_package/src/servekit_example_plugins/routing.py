"""A cache-affinity routing policy: send a request where most of its prompt is cached.

Each candidate replica scores ``cached_blocks - load_penalty * load / weight``, where
``cached_blocks`` is how many of the request's leading KV blocks the replica is known to hold
and ``load`` its load estimate (its own report, or this router's in-flight count). A replica
whose reported KV usage is above ``max_kv_usage`` goes after every other one. Highest score
first; ties keep the router's order. Stateless: membership changes need nothing.

    Router(replicas, policy="cache_affinity", index=my_kv_event_index)
"""

from __future__ import annotations

from collections.abc import Sequence

from servekit.route import Candidate, Choice, RouteRequest, StatelessPolicy


class CacheAffinityPolicy(StatelessPolicy):
    """Most cached blocks first, penalised by load; nearly full KV caches last."""

    api_version = 1  # the RoutingPolicy interface version this implements

    def __init__(self, load_penalty: float = 1.0, max_kv_usage: float = 0.95) -> None:
        if isinstance(load_penalty, bool) or not isinstance(load_penalty, (int, float)) \
                or load_penalty < 0:
            raise ValueError(f"load_penalty must be a number >= 0, got {load_penalty!r}")
        if not isinstance(max_kv_usage, (int, float)) or not 0 < max_kv_usage <= 1:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {max_kv_usage!r}")
        self.load_penalty = float(load_penalty)
        self.max_kv_usage = float(max_kv_usage)

    def _sort_key(self, candidate: Candidate) -> tuple[bool, float]:
        load = candidate.load
        full = load is not None and load.kv_usage > self.max_kv_usage
        score = candidate.cached_blocks - self.load_penalty * (
            candidate.load_estimate / candidate.weight)
        return full, -score

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """Candidates by score, best first."""
        ranked = sorted(candidates, key=self._sort_key)
        return Choice(tuple(c.name for c in ranked[:count]))
