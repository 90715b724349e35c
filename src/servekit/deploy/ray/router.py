"""servekit's routing policies as Ray Serve's custom request router.

Ray Serve asks a :class:`~ray.serve.request_router.RequestRouter` to rank replicas for each
call (``choose_replicas``); :class:`ServekitRequestRouter` answers with a
:class:`servekit.route.Router` (the gateway's: routing key, bounded loads, the policy), so the
cache-aware policy picks the replica for ``generate`` calls: it reads the prompt's token ids from
the call, hashes its blocks as the replicas' KV cache does, and weighs what each replica holds
(:class:`~servekit.route.kv_index.KVEventIndex`, rebuilt from the held-block snapshots the
replicas report in their routing stats) against its load (the reported ``running + waiting``,
or this router's in-flight count when higher). Other calls (``info``, ``load``) and requests the
policy cannot route (no key for consistent hashing) go to the least loaded replica.

The ranks Ray gets are ``[[choice], [fallbacks...]]``: Ray still probes a replica's queue and
moves to the next rank when it is full (``max_ongoing_requests``).

Kwargs (``RequestRouterConfig.request_router_kwargs``): ``policy`` (a routing-policy spec,
default ``cache_aware``), ``block_size`` and ``hash_algorithm`` (the replicas' KV cache),
``prefix_blocks`` (how many leading blocks make the routing key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from servekit.route import PrefixKey, ReplicaLoad, RouteError, Router
from servekit.route.kv_index import KVEventIndex

__all__ = ["ServekitRequestRouter"]

#: The replica method whose calls the policy routes.
ROUTED_METHOD = "generate"


class ServekitRequestRouter(RequestRouter):  # type: ignore[misc]  # ray is untyped
    """Routes ``generate`` calls with a servekit routing policy (see the module docstring)."""

    def initialize_state(self, policy: str = "cache_aware", block_size: int = 16,
                         hash_algorithm: str = "xxhash", prefix_blocks: int = 4,
                         **kwargs: Any) -> None:
        """Called by Ray Serve with ``request_router_kwargs``."""
        self.index = KVEventIndex()
        self.router = Router((), policy=policy, index=self.index,
                             prefix=PrefixKey(block_size, prefix_blocks, hash_algorithm))
        self._versions: dict[str, Any] = {}
        self._in_flight: dict[str, str] = {}  # Ray's internal request id -> replica name

    # ---- Ray's callbacks ------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        """One rank of the policy's choice, then its fallbacks."""
        if not candidate_replicas:
            return []
        self._sync()
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        request = _routed_call(pending_request)
        if request is None:
            return [self._least_loaded(candidate_replicas)]
        token_ids, tenant, cache_salt = request
        router = self.router
        exclude = [n for n in router.replicas if n not in by_name]
        try:
            route = router.route(token_ids=token_ids, tenant=tenant, cache_salt=cache_salt,
                                 exclude=exclude)
        except RouteError:
            return [self._least_loaded(candidate_replicas)]
        router.release(route.node, None)  # counted in flight once Ray has sent it
        ranks = [[by_name[route.node]]]
        if route.fallbacks:
            ranks.append([by_name[n] for n in route.fallbacks if n in by_name])
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        """Count the request in flight on its replica."""
        name = replica_id.unique_id
        if name in self.router.replicas:
            self.router.acquire(name)
            self._in_flight[pending_request.metadata.internal_request_id] = name

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The request ended: no longer in flight."""
        name = self._in_flight.pop(internal_request_id, None)
        if name is not None and name in self.router.replicas:
            self.router.release(name, None)

    # ---- internals ------------------------------------------------------------------------

    def _sync(self) -> None:
        """Membership, reported loads and held blocks from Ray's current replica set."""
        router, index = self.router, self.index
        current = {r.replica_id.unique_id: r for r in self.curr_replicas.values()}
        for name in [n for n in router.replicas if n not in current]:
            router.remove_replica(name)
            index.remove_replica(name)
            self._versions.pop(name, None)
        for name, replica in current.items():
            if name not in router.replicas:
                router.add_replica(name)
            stats = replica.routing_stats or {}
            if "running" in stats:
                router.report_load(name, ReplicaLoad(
                    int(stats["running"]), int(stats["waiting"]),
                    min(1.0, max(0.0, float(stats["kv_usage"])))))
            version = stats.get("blocks_version")
            if version is not None and self._versions.get(name) != version:
                index.remove_replica(name)
                index.stored(name, 0, stats.get("blocks", ()))
                self._versions[name] = version

    def _least_loaded(self, replicas: Sequence[RunningReplica]) -> list[RunningReplica]:
        router = self.router

        def load(r: RunningReplica) -> int:
            name = r.replica_id.unique_id
            reported = router.reported_load(name) if name in router.replicas else None
            busy = reported.running + reported.waiting if reported is not None else 0
            return max(busy, router.load(name) if name in router.replicas else 0)

        return sorted(replicas, key=load)


def _routed_call(pending: PendingRequest | None) -> tuple[list[int], str | None, str | None] | None:
    """``(token ids, tenant, cache salt)`` of a ``generate`` call, else None."""
    if pending is None or pending.metadata.call_method != ROUTED_METHOD or not pending.args:
        return None
    prompt = pending.args[0]
    if not isinstance(prompt, list):
        return None
    kwargs = pending.kwargs
    return prompt, kwargs.get("tenant"), kwargs.get("cache_salt")
