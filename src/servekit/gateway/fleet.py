"""The replicas behind a gateway: what each told us, and the loops that keep it current.

Per replica (named by its base URL) one task probes ``/ready`` (a failing or draining replica
is taken out of rotation; when it is ready again its circuit breaker is half-open: one request
is let through, and its success puts the replica back in rotation) and, with the shared gateway secret, reads its
info document once per process ``epoch`` and long-polls its KV events and load into the
:class:`~servekit.route.KVEventIndex` and the router. Without the secret (a replica that is not
servekit, or not configured to trust us) routing falls back to in-flight counts.

The replica list can change at run time: :meth:`Fleet.set_replicas` adds and removes replicas
(a removed one's requests in flight finish; it gets no new ones, and its index entry and watch
task go), and with ``replicas_file`` the fleet re-reads that file (one base URL per line, ``#``
comments) every ``probe_interval`` seconds and applies each edit once two reads in a row
agree (:class:`SettledText`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx

from servekit.gateway.tokens import PromptEncoder
from servekit.protocol.replica import GATEWAY_SECRET_HEADER
from servekit.route import HealthTracker, ReplicaLoad, Router
from servekit.route.errors import UnknownNodeError
from servekit.route.health import NodeHealth
from servekit.route.kv_index import KVEventIndex

logger = logging.getLogger(__name__)



class Fleet:
    """The router, the KV-event index and each replica's prompt encoder."""

    def __init__(self, replicas: Sequence[str], *, policy: str = "cache_aware",
                 secret: str | None = None, probe_interval: float = 0.5,
                 failure_threshold: int = 3, cooldown: float = 2.0,
                 slow_start: float = 0.0, replicas_file: str | Path | None = None) -> None:
        self._static = _distinct(replicas)
        self.replicas_file = Path(replicas_file) if replicas_file is not None else None
        from_file = read_replicas_file(self.replicas_file) if self.replicas_file else ()
        self.urls = _distinct([*self._static, *from_file])
        self._joins = itertools.count()
        #: Each replica's incarnation: a new number each time it joins the fleet.
        self.joined: dict[str, int] = {url: next(self._joins) for url in self.urls}
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
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None

    def encoder(self) -> PromptEncoder | None:
        """A prompt encoder (replicas of one fleet serve one model with one tokenizer)."""
        for enc in self.encoders.values():
            return enc
        return None

    def max_model_len(self) -> int | None:
        """The context length the replicas reported (the smallest), None before any did."""
        return min(self.max_model_lens.values(), default=None)

    async def run(self, client: httpx.AsyncClient) -> None:
        """Keep every replica's state (and the replicas file's list) current until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg, self._client = tg, client
            try:
                for url in self.urls:
                    self._start(url)
                if self.replicas_file is not None:
                    tg.start_soon(self._watch_file, self.replicas_file)
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def release(self, url: str, success: bool | None = True, joined: int | None = None) -> None:
        """:meth:`Router.release`, ignoring a replica removed while the request was in flight;
        ``joined``, its incarnation when the request was routed (:attr:`joined`): a replica
        that left and came back since starts a new count, which this release leaves alone."""
        if joined is not None and self.joined.get(url) != joined:
            return
        with contextlib.suppress(UnknownNodeError):
            self.router.release(url, success)

    def set_replicas(self, urls: Sequence[str]) -> None:
        """Make the fleet ``urls`` (plus the replicas given at construction): new ones join
        (``UP``, watched at once), missing ones leave."""
        wanted = _distinct([*self._static, *urls])
        for url in self.urls:
            if url not in wanted:
                self._remove(url)
        for url in wanted:
            if url not in self.urls:
                self.router.add_replica(url)
                self.joined[url] = next(self._joins)
                if self._tg is not None:
                    self._start(url)
                logger.info("replica %s joined", url)
        self.urls = wanted

    def _remove(self, url: str) -> None:
        self.router.remove_replica(url)
        self.joined.pop(url, None)
        self.index.remove_replica(url)
        scope = self._scopes.pop(url, None)
        if scope is not None:
            scope.cancel()
        for known in (self.encoders, self.epochs, self.models, self.max_model_lens):
            known.pop(url, None)  # type: ignore[attr-defined]
        logger.info("replica %s left", url)

    def _start(self, url: str) -> None:
        assert self._tg is not None and self._client is not None
        scope = self._scopes[url] = anyio.CancelScope()
        client = self._client

        async def watch() -> None:
            with scope:
                await self._watch(client, url)

        self._tg.start_soon(watch)

    async def _watch_file(self, path: Path) -> None:
        """Re-read ``path`` every ``probe_interval`` seconds; apply an edit once it has read
        the same twice in a row."""
        edits = SettledText()
        failing = False
        while True:
            try:
                text = await anyio.Path(path).read_text()
            except OSError as exc:  # e.g. mid-replace: keep the list, say so once
                if not failing:
                    logger.warning("replicas file %s: %s (keeping the list)", path, exc)
                failing = True
            else:
                failing = False
                if edits.settled(text):
                    try:
                        self.set_replicas(parse_replicas(text, str(path)))
                    except ValueError as exc:
                        logger.error("%s (keeping the list)", exc)
            await anyio.sleep(self.probe_interval)

    async def _watch(self, client: httpx.AsyncClient, url: str) -> None:
        """Poll ``url``'s readiness (and KV events) until it leaves the fleet. Its removal
        cancels this task, but a task whose await had already completed sees that only at
        its next await: it may find the replica gone first, which ends the watch too (it
        used to raise out of the fleet's task group and stop every watch, the replicas
        file's included)."""
        with contextlib.suppress(UnknownNodeError):
            await self._poll(client, url)

    async def _poll(self, client: httpx.AsyncClient, url: str) -> None:
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
            if health.state(url) is NodeHealth.DOWN:  # back: half-open, a probe decides
                logger.info("replica %s is ready: half-open until a request succeeds", url)
                health.readmit(url)
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


class SettledText:
    """A watched file's edits, each taken once two reads in a row agree: a file rewritten in
    place (truncated, then written) reads empty or cut short in between, and applying that
    would drop replicas for a moment, or add one at a cut-off address. ``applied``: the text
    taken last (None before any)."""

    def __init__(self) -> None:
        self.applied: str | None = None
        self._last_read: str | None = None

    def settled(self, text: str) -> bool:
        """``text`` was read now: whether it is a new edit to apply (it differs from the one
        applied last and the read before saw the same)."""
        new = text == self._last_read and text != self.applied
        self._last_read = text
        if new:
            self.applied = text
        return new


def parse_replicas(text: str, source: str = "replicas file") -> list[str]:
    """Base URLs, one per line (blank lines and ``#`` comments skipped); a line that is not an
    ``http://`` or ``https://`` URL raises ValueError naming it."""
    urls = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not is_replica_url(line):
            raise ValueError(f"{source}:{number}: not a replica base URL: {line!r}")
        urls.append(line)
    return urls


def is_replica_url(text: str) -> bool:
    """Whether ``text`` looks like a replica's base URL (``http(s)://`` and no spaces)."""
    return (text.startswith(("http://", "https://")) and len(text) > 8
            and not any(c.isspace() or c == "#" for c in text))


def read_replicas_file(path: Path) -> list[str]:
    """:func:`parse_replicas` of ``path`` (an unreadable file raises OSError)."""
    return parse_replicas(path.read_text(), str(path))


def _distinct(urls: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(u.rstrip("/") for u in urls))
