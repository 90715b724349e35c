"""The cache-aware routing policy: expected cached prompt tokens against load, bounded.

For a request whose prompt has ``n`` full KV blocks, a candidate replica that (by the KV-event
index) holds ``k`` of its leading blocks and carries load ``L`` (its own reported running +
waiting, or this router's in-flight count when higher; per unit of weight) scores::

    score = k / n  -  load_weight * L / (mean_L + 1)

where ``mean_L`` is the weighted mean load of the candidates. ``k / n`` is the fraction of the
prompt's prefill the replica can skip; the load term is the replica's load relative to the
fleet's. With the default ``load_weight = 1`` a full prefix hit is worth one mean load
of queueing. Replicas at or over the bounded-load capacity ``ceil(c * (total + 1) * share)``
(c = 1.25 by default) are only fallbacks, so no replica exceeds c times the mean. Ties (e.g. a
prompt nobody holds yet, at equal loads) break by rendezvous hashing of the routing key, so
every gateway sends a new prefix to the same replica and its cache warms there.

Every input is shared by the fleet (the replicas' KV events and reported loads, the request),
so N gateways reading the same reports make the same choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from servekit.route.bounded import DEFAULT_LOAD_FACTOR, capacity, check_load_factor
from servekit.route.errors import InvalidRouteParameterError
from servekit.route.policy import Candidate, Choice, RouteRequest, StatelessPolicy


def _key_bytes(request: RouteRequest) -> bytes:
    key = request.key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    if request.block_hashes:
        return request.block_hashes[0].to_bytes(8, "little")
    return b""


class CacheAwarePolicy(StatelessPolicy):
    """Picks the replica with the best ``cached fraction - load`` score under bounded loads
    (see the module docstring for the score)."""

    def __init__(
        self, *, load_factor: float | None = DEFAULT_LOAD_FACTOR, load_weight: float = 1.0
    ) -> None:
        self.load_factor = None if load_factor is None else check_load_factor(load_factor)
        if isinstance(load_weight, bool) or not isinstance(load_weight, (int, float)) or not (
            0 <= load_weight < float("inf")
        ):
            raise InvalidRouteParameterError(
                "load_weight", f"must be a finite number >= 0, got {load_weight!r}"
            )
        self.load_weight = float(load_weight)

    def score(self, request: RouteRequest, cand: Candidate, mean_load: float) -> float:
        """The candidate's score (higher is better)."""
        n = len(request.block_hashes)
        hit = min(cand.cached_blocks, n) / n if n else 0.0
        return hit - self.load_weight * (cand.load_estimate / cand.weight) / (mean_load + 1.0)

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], count: int
    ) -> Choice:
        """Best-scoring replicas under their capacity, then the overloaded ones."""
        total = sum(c.load_estimate for c in candidates)
        weight = sum(c.weight for c in candidates)
        mean = total / weight
        salt = _key_bytes(request)

        def rank(cand: Candidate) -> tuple[float, int]:
            tie = xxhash.xxh3_64_intdigest(salt + cand.name.encode())
            return (-self.score(request, cand, mean), tie)

        ordered = sorted(candidates, key=rank)
        c = self.load_factor
        if c is None:
            return Choice(tuple(x.name for x in ordered[:count]))
        under = [x for x in ordered if x.load_estimate < capacity(total, x.weight / weight, c)]
        over = [x for x in ordered if x.load_estimate >= capacity(total, x.weight / weight, c)]
        picked = (under + over)[:count]
        return Choice(tuple(x.name for x in picked), ordered.index(picked[0]))
