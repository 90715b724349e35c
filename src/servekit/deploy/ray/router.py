"""servekit's routing policies as Ray Serve's custom request router.

Ray Serve asks a :class:`~ray.serve.request_router.RequestRouter` to rank replicas for each
call (``choose_replicas``); :class:`ServekitRequestRouter` answers with a
:class:`servekit.route.Router` (the gateway's: routing key, bounded loads, the policy), so the
cache-aware policy picks the replica for ``generate`` calls: it reads the prompt's token ids from
the call, hashes its blocks as the replicas' KV cache does, and weighs what each replica holds
(:class:`~servekit.route.kv_index.KVEventIndex`, rebuilt from the held-block snapshots the
replicas report in their routing stats, plus the prompts this router sent each replica since:
see below) against its load (the reported ``running + waiting``, or this router's in-flight
count when higher; only the latter with ``reported_load`` off). Other calls (``info``,
``load``) and requests the policy cannot route (no key for consistent hashing) go to the least
loaded replica.

A request counts in flight on its replica from ``on_request_routed`` until its call is done
(success, error, cancelled, replica lost): a done callback registered on the call's result right
after the count releases it, once. (Not Ray's ``on_request_completed``: Ray registers its own
callback before it awaits the replica's acceptance, so a call that ends while this router's loop
is busy reaches ``on_request_completed`` before ``on_request_routed`` and its count would never
be released; and it fires for a rejected attempt too, under the same request id as the retry.)

A report is up to ``routing_stats_period`` old when it arrives (Ray's controller pulls the
stats and pushes them to every router), where the gateway reads KV events as they happen. So
the blocks of a prompt this router sends count as held by its replica at once, and keep counting
across reports for ``sent_ttl`` seconds (by then a report includes them, or the replica did not
keep them): the next turn of a conversation, or another request with the same system prompt,
follows the first without waiting for a report.

The ranks Ray gets are ``[[choice], [fallbacks...]]``: Ray still probes a replica's queue and
moves to the next rank when it is full (``max_ongoing_requests``).

Each router registers itself (:func:`~servekit.deploy.ray.metrics.register_router`): the
ingress's ``/metrics`` shows each replica's last reported load from it. (Ray pickles this module
by value for the handles, so its own globals are copies in each process: the registry lives in
another module.)

Kwargs (``RequestRouterConfig.request_router_kwargs``): ``policy`` (a routing-policy spec,
default ``cache_aware``), ``block_size`` and ``hash_algorithm`` (the replicas' KV cache),
``prefix_blocks`` (how many leading blocks make the routing key), ``sent_ttl`` (seconds, default
2), ``reported_load`` (default true: weigh the replicas' reported ``running + waiting``; with a
single ingress replica its router sends every request, so its own in-flight counts are exact
and a report, a period old, would only lag: ``build_app`` turns it off then).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from servekit.deploy.ray.metrics import register_router
from servekit.route import PrefixKey, ReplicaLoad, RouteError, Router
from servekit.route.kv_index import KVEventIndex

__all__ = ["ReplicaRouting", "ServekitRequestRouter"]

#: The replica method whose calls the policy routes.
ROUTED_METHOD = "generate"
#: Seconds a sent prompt's blocks count as held by its replica without a report (default).
SENT_TTL = 2.0


class ReplicaRouting:
    """The routing state of one Ray router, free of Ray types: replicas by name, what each
    reports (``record_routing_stats``), the KV index, and the requests in flight."""

    def __init__(self, policy: str = "cache_aware", block_size: int = 16,
                 hash_algorithm: str = "xxhash", prefix_blocks: int = 4,
                 sent_ttl: float = SENT_TTL, reported_load: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = KVEventIndex()
        self.router = Router((), policy=policy, index=self.index,
                             prefix=PrefixKey(block_size, prefix_blocks, hash_algorithm))
        self.sent_ttl = sent_ttl
        self.reported_load = reported_load
        self.clock = clock
        self._versions: dict[str, Any] = {}
        self._in_flight: dict[str, str] = {}  # request id -> replica
        self._sent: deque[tuple[float, str, tuple[int, ...]]] = deque()  # (when, where, blocks)

    def sync(self, replicas: Mapping[str, Mapping[str, Any]]) -> None:
        """Membership, reported loads and held blocks from ``{name: routing stats}``."""
        router, index = self.router, self.index
        for name in [n for n in router.replicas if n not in replicas]:
            router.remove_replica(name)
            index.remove_replica(name)
            self._versions.pop(name, None)
        for name, stats in replicas.items():
            if name not in router.replicas:
                router.add_replica(name)
            if self.reported_load and "running" in stats:
                router.report_load(name, ReplicaLoad(
                    int(stats["running"]), int(stats["waiting"]),
                    min(1.0, max(0.0, float(stats["kv_usage"])))))
            version = stats.get("blocks_version")
            if version is not None and self._versions.get(name) != version:
                index.remove_replica(name)
                index.stored(name, 0, stats.get("blocks", ()))
                self._versions[name] = version
                for _, where, blocks in self._recent():
                    if where == name:
                        self._hold(name, blocks)

    def choose(self, candidates: Sequence[str],
               call: tuple[list[int], str | None, str | None] | None) -> list[list[str]]:
        """Ranks of candidate names for a ``generate`` call ``(token ids, tenant, salt)``: the
        policy's choice, then its fallbacks; other calls: every candidate, least loaded first."""
        router = self.router
        if call is not None:
            token_ids, tenant, cache_salt = call
            allowed = set(candidates)
            try:
                route = router.route(token_ids=token_ids, tenant=tenant, cache_salt=cache_salt,
                                     exclude=[n for n in router.replicas if n not in allowed])
            except RouteError:
                pass
            else:
                router.release(route.node, None)  # counted in flight once it is sent
                ranks = [[route.node]]
                if route.fallbacks:
                    ranks.append(list(route.fallbacks))
                return ranks
        return [sorted(candidates, key=self._load)]

    def routed(self, request_id: str, name: str,
               call: tuple[list[int], str | None, str | None] | None = None) -> None:
        """A request (a ``generate`` ``call``, see :meth:`choose`) was sent to ``name``: in
        flight there until :meth:`completed`."""
        if name not in self.router.replicas:
            return
        self.router.acquire(name)
        self._in_flight[request_id] = name
        if call is not None:
            token_ids, _, cache_salt = call
            blocks = tuple(self.router.prefix.block_hashes(token_ids, cache_salt))
            if blocks:
                self._sent.append((self.clock(), name, blocks))
                self._hold(name, blocks)

    def completed(self, request_id: str) -> None:
        """A request :meth:`routed` ended (no-op for any other id, or a second time)."""
        name = self._in_flight.pop(request_id, None)
        if name is not None and name in self.router.replicas:
            self.router.release(name, None)

    def in_flight(self, name: str) -> int:
        """Requests this router sent to ``name`` that have not completed (0 if unknown)."""
        router = self.router
        return router.load(name) if name in router.replicas else 0

    def _recent(self) -> deque[tuple[float, str, tuple[int, ...]]]:
        """The prompts sent within ``sent_ttl`` (older ones dropped)."""
        sent, oldest = self._sent, self.clock() - self.sent_ttl
        while sent and sent[0][0] < oldest:
            sent.popleft()
        return sent

    def _hold(self, name: str, blocks: Sequence[int]) -> None:
        """Count ``blocks`` as held by ``name`` until its next report."""
        last = self.index.last_seq(name)
        self.index.stored(name, 0 if last is None else last + 1, blocks)

    def _load(self, name: str) -> int:
        router = self.router
        if name not in router.replicas:
            return 0
        reported = router.reported_load(name)
        busy = reported.running + reported.waiting if reported is not None else 0
        return max(busy, router.load(name))


class ServekitRequestRouter(RequestRouter):  # type: ignore[misc]  # ray is untyped
    """Routes ``generate`` calls with a servekit routing policy (see the module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Ray Serve with ``request_router_kwargs`` (:class:`ReplicaRouting`'s)."""
        self.routing = ReplicaRouting(**kwargs)
        register_router(self)

    def replica_reports(self) -> dict[str, dict[str, Any]]:
        """Each current replica's last routing stats (``record_routing_stats``, without the
        block list) and ``router_in_flight`` (this router's own count), by replica id."""
        routing = self.routing
        return {r.replica_id.unique_id: {
                    **{k: v for k, v in (r.routing_stats or {}).items() if k != "blocks"},
                    "router_in_flight": routing.in_flight(r.replica_id.unique_id)}
                for r in list(self.curr_replicas.values())}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        """The policy's choice, then its fallbacks (Ray probes each rank in turn)."""
        if not candidate_replicas:
            return []
        self.routing.sync({r.replica_id.unique_id: r.routing_stats or {}
                           for r in self.curr_replicas.values()})
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = self.routing.choose(list(by_name), _routed_call(pending_request))
        return [[by_name[n] for n in rank if n in by_name] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        """Count the request in flight on its replica until ``result`` (Ray's
        ``ReplicaResult`` of the call) is done, and its prompt's blocks as held there (see the
        module docstring)."""
        request_id = pending_request.metadata.internal_request_id
        self.routing.routed(request_id, replica_id.unique_id, _routed_call(pending_request))
        # registered after the count: on a call already done Ray runs it at once; from any
        # thread, so the release goes through this router's loop, as every other hook runs
        loop = asyncio.get_running_loop()
        result.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self.routing.completed, request_id))


def _routed_call(pending: PendingRequest | None) -> tuple[list[int], str | None, str | None] | None:
    """``(token ids, tenant, cache salt)`` of a ``generate`` call, else None."""
    if pending is None or pending.metadata.call_method != ROUTED_METHOD or not pending.args:
        return None
    prompt = pending.args[0]
    if not isinstance(prompt, list):
        return None
    kwargs = pending.kwargs
    return prompt, kwargs.get("tenant"), kwargs.get("cache_salt")
