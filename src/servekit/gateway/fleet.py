"""The replicas behind a gateway: what each told us, and the loops that keep it current.

Per replica (named by its base URL) one task probes ``/ready`` (a failing or draining replica
is taken out of rotation, a ready one put back) and, with the shared gateway secret, reads its
info document once per process ``epoch`` and long-polls its KV events and load into the
:class:`~servekit.route.KVEventIndex` and the router. Without the secret (a replica that is not
servekit, or not configured to trust us) routing falls back to in-flight counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
import httpx

from servekit.gateway.tokens import PromptEncoder
from servekit.route import HealthTracker, ReplicaLoad, Router
from servekit.route.health import NodeHealth
from servekit.route.kv_index import KVEventIndex

logger = logging.getLogger(__name__)

GATEWAY_SECRET_HEADER = "x-servekit-gateway-secret"


class Fleet:
    """The router, the KV-event index and each replica's prompt encoder."""

    def __init__(self, replicas: Sequence[str], *, policy: str = "cache_aware",
                 secret: str | None = None, probe_interval: float = 0.5,
                 failure_threshold: int = 3, cooldown: float = 2.0,
                 slow_start: float = 0.0) -> None:
        self.urls = tuple(u.rstrip("/") for u in replicas)
        self.index = KVEventIndex()
        self.router = Router(self.urls, policy=policy, index=self.index,
                             health=HealthTracker(failure_threshold=failure_threshold,
                                                  cooldown=cooldown),
                             slow_start=slow_start)
        self.secret = secret
        self.probe_interval = probe_interval
        self.encoders: dict[str, PromptEncoder] = {}
        self.epochs: dict[str, str] = {}
        self.models: dict[str, list[str]] = {}
        self.max_model_lens: dict[str, int] = {}

    def encoder(self) -> PromptEncoder | None:
        """A prompt encoder (replicas of one fleet serve one model with one tokenizer)."""
        for enc in self.encoders.values():
            return enc
        return None

    def max_model_len(self) -> int | None:
        """The context length the replicas reported (the smallest), None before any did."""
        return min(self.max_model_lens.values(), default=None)

    async def run(self, client: httpx.AsyncClient) -> None:
        """Keep every replica's state current until cancelled."""
        async with anyio.create_task_group() as tg:
            for url in self.urls:
                tg.start_soon(self._watch, client, url)

    async def _watch(self, client: httpx.AsyncClient, url: str) -> None:
        headers = {GATEWAY_SECRET_HEADER: self.secret} if self.secret else {}
        health = self.router.health
        after = -1
        while True:
            try:
                ready = (await client.get(url + "/ready", timeout=2.0)).status_code == 200
            except httpx.HTTPError:
                ready = False
            if not ready:
                if health.state(url) is not NodeHealth.DOWN:
                    logger.info("replica %s is not ready: out of rotation", url)
                health.mark_down(url)
                await anyio.sleep(self.probe_interval)
                continue
            if health.state(url) is NodeHealth.DOWN:
                health.mark_up(url)
            if not self.secret:
                await anyio.sleep(self.probe_interval)
                continue
            try:
                after = await self._sync(client, url, headers, after)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                logger.debug("replica %s: event feed failed: %r", url, exc)
                await anyio.sleep(self.probe_interval)

    async def _sync(self, client: httpx.AsyncClient, url: str, headers: dict[str, str],
                    after: int) -> int:
        """One long poll of the KV events; returns the last sequence number applied."""
        resp = await client.get(url + "/servekit/kv_events", headers=headers,
                                params={"after": after, "timeout": self.probe_interval},
                                timeout=self.probe_interval + 5.0)
        resp.raise_for_status()
        doc = resp.json()
        if self.epochs.get(url) != doc["epoch"]:  # first contact, or the replica restarted
            await self._learn(client, url, headers)
            self.index.reset(url)
            self.epochs[url] = doc["epoch"]
            if after != -1:
                return -1  # re-read from the new process's first event
        load = doc["load"]
        self.router.report_load(url, ReplicaLoad(int(load["running"]), int(load["waiting"]),
                                                 min(1.0, max(0.0, float(load["kv_usage"])))))
        self._apply(url, doc["events"])
        return int(doc["next_seq"]) - 1 if doc["events"] or after == -1 else after

    def _apply(self, url: str, events: list[dict[str, Any]]) -> None:
        index = self.index
        for ev in events:
            kind, seq = ev["type"], int(ev["seq"])
            if kind == "stored":
                index.stored(url, seq, ev["block_hashes"])
            elif kind == "removed":
                index.removed(url, seq, ev["block_hashes"])
            elif kind == "cleared":
                index.cleared(url, seq)

    async def _learn(self, client: httpx.AsyncClient, url: str,
                     headers: dict[str, str]) -> None:
        resp = await client.get(url + "/servekit/info", headers=headers, timeout=30.0)
        resp.raise_for_status()
        info = resp.json()
        self.models[url] = list(info["models"])
        self.max_model_lens[url] = int(info["max_model_len"])
        self.encoders[url] = await anyio.to_thread.run_sync(PromptEncoder, info)
