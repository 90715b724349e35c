"""The simulated fleet's parts: a replica (the real Scheduler and KVCacheManager on the
simulator's clock) and a gateway (the real Router and the shared real Limiter)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from servekit.kv.manager import KVCacheManager
from servekit.limit.bucket import Limit
from servekit.limit.limiter import Limiter
from servekit.limit.store import MemoryStore
from servekit.route.policy import (
    ConsistentHashPolicy,
    PowerOfTwoChoicesPolicy,
    RoutingPolicy,
    make_routing_policy,
)
from servekit.route.router import Router
from servekit.sched.output import SchedulerOutput
from servekit.sched.params import SamplingParams
from servekit.sched.request import Request
from servekit.sched.scheduler import Scheduler
from servekit.sim.scenario import GatewayConfig, ReplicaConfig
from servekit.sim.workload import Tenant

__all__ = ["KVEventIndex", "Replica", "SimRequest", "make_limiters", "make_router"]


class SimRequest(Request):
    """A scheduler request that points back at the simulator's record of it."""

    __slots__ = ("rec",)

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, *,
                 priority: int, tenant: str, arrival_time: float, rec: object) -> None:
        # Request validates every prompt token id; the simulator draws valid ids itself, and
        # checking ~1,000 ids per request was a third of a planner run: validate one, then
        # hand over the whole prompt list
        super().__init__(request_id, prompt[:1], params, priority=priority, tenant=tenant,
                         arrival_time=arrival_time)
        self.token_ids = prompt
        self.num_prompt_tokens = len(prompt)
        self.rec = rec


class Replica:
    """One engine replica: its scheduler, its KV cache, and the step in flight."""

    __slots__ = ("busy", "cutoff", "fe_end", "kv", "name", "out", "pending", "requests", "sched",
                 "steps", "uncharged")

    def __init__(self, name: str, config: ReplicaConfig, num_blocks: int, max_model_len: int,
                 clock: Callable[[], float], index: KVEventIndex | None = None) -> None:
        self.name = name
        on_event = None if index is None else (lambda e: index.on_event(name, e))
        self.kv = KVCacheManager(num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching,
                                 on_event=on_event)
        self.sched = Scheduler(
            self.kv, max_model_len=max_model_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk, policy=config.policy,
            max_waiting_requests=config.max_waiting_requests, clock=clock)
        self.busy = False
        self.out: SchedulerOutput | None = None
        self.steps = 0
        self.requests = 0  # routed here
        # the front end's work (FrontendCost): requests it has yet to admit, and when the work
        # queued on this replica's thread ends (-1: none queued), how many pending arrivals
        # came during the step in flight (charged when it ends), and when the last step ended
        # (-1: the replica was idle): only requests admitted by then join the next step
        self.pending: list[tuple[Any, SimRequest]] = []
        self.fe_end = -1.0
        self.uncharged = 0
        self.cutoff = -1.0


class KVEventIndex:
    """Which replica holds which KV block, from the replicas' KV events (BlockStored,
    BlockRemoved, AllBlocksCleared): the router's :class:`~servekit.route.router.CacheIndex`.
    Events arrive as they happen, so this is the index of a gateway with no lag."""

    def __init__(self) -> None:
        self._where: dict[int, set[str]] = {}

    def on_event(self, replica: str, event: KVEvent) -> None:
        """Apply one replica's KV event."""
        where = self._where
        if isinstance(event, BlockStored):
            for h in event.block_hashes:
                where.setdefault(h, set()).add(replica)
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                holders = where.get(h)
                if holders is not None:
                    holders.discard(replica)
                    if not holders:
                        del where[h]
        elif isinstance(event, AllBlocksCleared):
            for h in [h for h, holders in where.items() if replica in holders]:
                self.on_event(replica, BlockRemoved((h,)))

    def cached_blocks(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """For each replica holding the first block, how many leading blocks it holds."""
        if not block_hashes:
            return {}
        where = self._where
        holders = where.get(block_hashes[0])
        if not holders:
            return {}
        counts: dict[str, int] = {}
        for replica in holders:
            n = 1
            for h in block_hashes[1:]:
                if replica not in where.get(h, ()):
                    break
                n += 1
            counts[replica] = n
        return counts


def make_policy(config: GatewayConfig, seed: int) -> RoutingPolicy:
    """The routing policy a gateway config names: a built-in (``power_of_two`` draws from
    ``seed``, ``consistent_hash`` takes ``load_factor``) or any plugin spec."""
    if config.routing == "consistent_hash":
        return ConsistentHashPolicy(load_factor=config.load_factor)
    if config.routing == "power_of_two":
        return PowerOfTwoChoicesPolicy(random.Random(seed))
    return make_routing_policy(config.routing)


def make_router(config: GatewayConfig, replicas: list[str], seed: int,
                clock: Callable[[], float], index: KVEventIndex | None = None) -> Router:
    """A real Router over ``replicas`` on the simulator's clock."""
    return Router(replicas, policy=make_policy(config, seed), clock=clock, index=index)


def make_limiters(tenants: tuple[Tenant, ...],
                  clock: Callable[[], float]) -> Mapping[str, Limiter]:
    """One real Limiter per tenant with limits (RPM and/or TPM), keyed by tenant name; every
    gateway uses the same ones (shared state, as through Redis)."""
    out: dict[str, Limiter] = {}
    for t in tenants:
        limits = []
        if t.rpm is not None:
            limits.append(Limit.per_minute("requests", t.rpm))
        if t.tpm is not None:
            limits.append(Limit.per_minute("tokens", t.tpm))
        if limits:
            out[t.name] = Limiter(limits, store=MemoryStore(), clock=clock)
    return out
