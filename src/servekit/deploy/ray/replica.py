"""The replica deployment: one engine, reached through Ray handles.

Each replica builds the engine the ``[engine]`` settings describe (as ``servekit serve`` does:
the demo model, ``engine.model``, or the fake engine), takes its CPU/GPU share from Ray's
``ray_actor_options``, and serves ``generate`` as a streaming method (one
:class:`~servekit.engine.outputs.RequestOutput` per item; deltas that queue up while the
previous item travels come merged: each item costs a Ray round, not each token). Cancelling the call (the ingress does when its client leaves)
closes the engine's stream, which aborts the request and frees its blocks.
``record_routing_stats`` reports the load, the prefix-cache counters and the KV blocks the
replica holds, which Ray Serve hands to :class:`~servekit.deploy.ray.router.ServekitRequestRouter`
(and the ingress shows on its ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, suppress
from typing import Any

import anyio
from ray import serve

from servekit.deploy.ray.autoscale import AUTOSCALING_METRICS
from servekit.engine.outputs import RequestOutput, merge_outputs
from servekit.errors import ServekitError
from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from servekit.metrics.events import CacheStats
from servekit.metrics.hooks import Hook, HookSet
from servekit.sched.params import SamplingParams
from servekit.server.cli import build_engine, build_plugins
from servekit.server.replica_api import replica_load
from servekit.server.service import admission_capacity

__all__ = ["MERGE_WINDOW", "EngineReplica", "HeldBlocks", "PrefixCacheCounters"]

#: Seconds a replica keeps merging deltas that arrive back to back into one Ray item.
MERGE_WINDOW = 0.002


class HeldBlocks(Hook):
    """The KV block hashes an engine holds, replayed from its KV events (any thread)."""

    def __init__(self) -> None:
        self._blocks: set[int] = set()
        self._lock = threading.Lock()
        self.version = 0

    def on_kv_event(self, event: Any) -> None:
        """Apply one KV event (:mod:`servekit.kv.events`)."""
        with self._lock:
            if isinstance(event, BlockStored):
                self._blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._blocks.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._blocks.clear()
            else:
                return
            self.version += 1

    def snapshot(self) -> tuple[int, list[int]]:
        """``(version, block hashes)``."""
        with self._lock:
            return self.version, list(self._blocks)


class PrefixCacheCounters(Hook):
    """The engine's cumulative prefix-cache counters (prompt tokens looked up and found), from
    its cache stats (any thread; an engine core in another process forwards them too)."""

    def __init__(self) -> None:
        self.queries = 0
        self.hits = 0

    def on_cache_stats(self, event: CacheStats) -> None:
        """Keep the latest cumulative counts."""
        self.queries, self.hits = event.prefix_queries, event.prefix_hits


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine per replica. ``settings`` is the checked settings namespace, as a dict."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        args = argparse.Namespace(**settings)
        self.held = HeldBlocks()
        self.prefix = PrefixCacheCounters()
        hooks = HookSet([self.held, self.prefix, *build_plugins(args).hooks])
        self.engine: Any = await anyio.to_thread.run_sync(build_engine, args, hooks)
        self._stack = AsyncExitStack()
        if hasattr(self.engine, "__aenter__"):
            await self._stack.enter_async_context(self.engine)
        self._coalesce = getattr(self.engine, "coalesces_outputs", False)
        self.requests = 0
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def __del__(self) -> None:
        await self._stack.aclose()

    async def generate(self, prompt: list[int] | str, params: SamplingParams, *,
                       request_id: str | None = None, tenant: str | None = None,
                       priority: int = 0, cache_salt: str | None = None,
                       output_token_ids: Sequence[int] = ()) -> AsyncIterator[RequestOutput]:
        """The engine's deltas for one request (call with ``handle.options(stream=True)``);
        ``output_token_ids`` resumes a generation after them."""
        self.requests += 1
        extra: dict[str, Any] = {"coalesce": True} if self._coalesce else {}
        if output_token_ids:
            extra["output_token_ids"] = list(output_token_ids)
        stream = self.engine.generate(prompt, params, request_id=request_id, tenant=tenant,
                                      priority=priority, cache_salt=cache_salt, **extra)
        # The engine's deltas are pumped into a queue by a task of their own, and each item
        # this generator yields merges what queued up since the last, and what keeps arriving
        # turn after turn of the event loop, for up to MERGE_WINDOW: every item costs a trip
        # through Ray (about half a millisecond of this loop's time), so a fast engine must not
        # pay one per token. A turn that brings nothing sends at once. (A Ray Serve replica
        # always runs on asyncio.)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for out in stream:
                    queue.put_nowait(out)
                queue.put_nowait(None)
            except Exception as exc:
                queue.put_nowait(exc)

        task = asyncio.create_task(pump())
        try:
            while True:
                items = [await queue.get()]
                until = loop.time() + MERGE_WINDOW
                while True:
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    if not isinstance(items[-1], RequestOutput) or loop.time() >= until:
                        break
                    await asyncio.sleep(0)  # one turn: do more deltas arrive right behind?
                    if queue.empty():
                        break
                outs = [i for i in items if isinstance(i, RequestOutput)]
                if outs:
                    yield merge_outputs(outs)
                if items[-1] is None:
                    return
                if isinstance(items[-1], BaseException):
                    raise items[-1]
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` if it runs here (no-op otherwise)."""
        with suppress(KeyError, ServekitError):
            await self.engine.abort(request_id)

    def info(self) -> dict[str, Any]:
        """What the ingress needs of the engine: its tokenizer (pickled), name and bounds."""
        return {"tokenizer": self.engine.tokenizer, "model_name": self.engine.model_name,
                "max_model_len": int(self.engine.max_model_len),
                "admission_capacity": admission_capacity(self.engine),
                "replica": self.replica_id}

    def load(self) -> dict[str, Any]:
        """``running``, ``waiting``, ``kv_usage``, the ``requests`` this replica served and its
        prefix cache's ``prefix_queries`` and ``prefix_hits`` (prompt tokens, cumulative)."""
        return {**replica_load(self.engine), "requests": self.requests,
                "prefix_queries": self.prefix.queries, "prefix_hits": self.prefix.hits,
                "replica": self.replica_id}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's autoscaler calls this: the engine's ``running``, ``waiting`` and
        ``kv_usage`` (:mod:`servekit.deploy.ray.autoscale`)."""
        load = replica_load(self.engine)
        return {name: float(load[name]) for name in AUTOSCALING_METRICS}

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every ``routing_stats_period`` s: the load and held blocks."""
        version, blocks = self.held.snapshot()
        return {**self.load(), "blocks_version": version, "blocks": blocks}
