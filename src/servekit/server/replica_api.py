"""What a replica tells a trusted gateway: its info, its load and its KV-event feed.

``GET /servekit/info`` names the served models, ``max_model_len``, the KV block size and hash
algorithm (so the gateway computes the same chained block hashes, :mod:`servekit.kv.hashing`)
and the tokenizer (its files and chat template, or ``"bytes"`` for the fake engine's).
``GET /servekit/kv_events?after=SEQ&timeout=S`` long-polls the KV events after ``SEQ``: each
``{"seq", "type": "stored"|"removed"|"cleared", "block_hashes"}``, numbered from 0 per process
(``epoch`` names the process: a new epoch means a restart), plus the replica's current load.
A replica keeps the last ``capacity`` events; a gateway that asks for older ones sees a gap in
the numbers and resets its index for this replica.

Both reveal internals (which prompts are cached), so they answer only requests that carry the
shared gateway secret in ``x-servekit-gateway-secret``; without a configured secret they are off
(404). The same secret lets a gateway ask for each streamed event's output token ids
(``x-servekit-extensions: token_ids``, sent as a ``: servekit {...}`` comment line before the
event) and the job's usage before ``[DONE]`` (``usage``, for its ledger record), and resume a cut stream (the ``servekit_resume`` body field), so it can fail over, and
name the caller it authenticated (``x-servekit-tenant``, ``x-servekit-cache-salt``), whose
limits it enforced.
"""

from __future__ import annotations

import collections
import hmac
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from servekit.limit.keys import ApiKey
from servekit.metrics.hooks import Hook, HookSet
from servekit.protocol.replica import (
    CACHE_SALT_HEADER,
    COMMENT_PREFIX,
    GATEWAY_SECRET_HEADER,
    TENANT_HEADER,
)

_POLL_INTERVAL = 0.01


class KVEventFeed(Hook):
    """A hook that numbers the KV events it sees and keeps the last ``capacity`` of them.

    Events may arrive from the engine's worker thread, so the buffer is guarded by a lock and
    readers poll it.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.epoch = os.urandom(8).hex()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._next = 0
        self._lock = threading.Lock()

    @property
    def next_seq(self) -> int:
        """The sequence number the next event will get."""
        return self._next

    def on_kv_event(self, event: Any) -> None:
        """Number and keep one KV event (``servekit.kv.events``)."""
        item: dict[str, Any]
        if isinstance(event, BlockStored):
            item = {"type": "stored", "block_hashes": list(event.block_hashes)}
        elif isinstance(event, BlockRemoved):
            item = {"type": "removed", "block_hashes": list(event.block_hashes)}
        elif isinstance(event, AllBlocksCleared):
            item = {"type": "cleared", "block_hashes": []}
        else:
            return
        with self._lock:
            item["seq"] = self._next
            self._next += 1
            self._events.append(item)

    def since(self, after: int) -> list[dict[str, Any]]:
        """The kept events numbered above ``after`` (the first may be later than
        ``after + 1`` when older ones were dropped)."""
        with self._lock:
            if after + 1 >= self._next:
                return []
            first = self._next - len(self._events)
            start = max(0, after + 1 - first)
            return [self._events[i] for i in range(start, len(self._events))]

    async def wait(self, after: int, timeout: float) -> list[dict[str, Any]]:
        """:meth:`since`, waiting up to ``timeout`` seconds for at least one event."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.since(after)
            if found or time.monotonic() >= deadline:
                return found
            await anyio.sleep(_POLL_INTERVAL)


def replica_load(engine: Any) -> dict[str, Any]:
    """``{"running", "waiting", "kv_usage"}`` as the engine knows them (zeros for unknowns)."""
    load = getattr(engine, "load", None)  # an engine core in another process reports its own
    if isinstance(load, dict) and load:
        return {"running": int(load["running"]), "waiting": int(load["waiting"]),
                "kv_usage": float(load["kv_usage"])}
    llm = getattr(engine, "engine", None)  # AsyncEngine -> LLMEngine
    sched = getattr(llm, "scheduler", None)
    if sched is not None:
        return {"running": int(sched.num_running), "waiting": int(sched.num_waiting),
                "kv_usage": float(llm.kv.usage)}  # type: ignore[union-attr]
    live = int(getattr(engine, "num_live_requests", 0) or 0)
    return {"running": live, "waiting": 0, "kv_usage": 0.0}


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """How a gateway rebuilds ``tokenizer``: ``{"kind": "bytes"}`` for the fake byte-level one,
    else ``{"kind": "files", "files": {name: text}}`` from ``save_pretrained``."""
    if not hasattr(tokenizer, "save_pretrained"):
        return {"kind": "bytes", "chat_template": getattr(tokenizer, "chat_template", None)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
    return {"kind": "files", "files": files,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def engine_info(engine: Any, model_names: tuple[str, ...]) -> dict[str, Any]:
    """The info document of a ready engine."""
    llm = getattr(engine, "engine", None)
    config = getattr(llm, "config", None)
    block_size: Any = getattr(config, "block_size", None) or getattr(engine, "block_size", 16)
    return {
        "models": list(model_names),
        "max_model_len": int(engine.max_model_len),
        "block_size": int(block_size),
        "hash_algorithm": "xxhash",
        "prefix_caching": bool(getattr(config, "enable_prefix_caching", False)
                               or getattr(engine, "prefix_caching", False)),
        "tokenizer": tokenizer_info(engine.tokenizer),
    }


def token_ids_comment(index: int, token_ids: list[int]) -> bytes:
    """The SSE comment line carrying choice ``index``'s new output token ids."""
    ids = ",".join(map(str, token_ids))
    return COMMENT_PREFIX + f'{{"index":{index},"token_ids":[{ids}]}}\n'.encode()


def usage_comment(usage: Any, finish_reasons: Sequence[str | None]) -> bytes:
    """The SSE comment event carrying a job's usage (``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``finish_reason``: its choices' reasons, sorted and joined by commas)
    for the trusted gateway, sent before the final ``[DONE]``."""
    reasons = ",".join(sorted({r for r in finish_reasons if r is not None}))
    return COMMENT_PREFIX + json.dumps({"usage": {
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens, "finish_reason": reasons or None}},
        separators=(",", ":")).encode() + b"\n\n"


def trusted(request: Request, secret: str | None) -> bool:
    """Whether ``request`` carries the gateway ``secret`` (constant-time compare)."""
    return _secret_matches(request.headers.get(GATEWAY_SECRET_HEADER), secret)


def _secret_matches(given: str | None, secret: str | None) -> bool:
    return secret is not None and given is not None and hmac.compare_digest(
        given.encode(), secret.encode())


def gateway_identity(headers: Mapping[str, str], secret: str | None) -> ApiKey | None:
    """The caller as the trusted gateway authenticated it (its tenant and cache salt, no
    limits: the gateway enforced them), or None when the request does not carry the secret
    and a tenant. A client cannot set these: without the secret they are ignored."""
    tenant = headers.get(TENANT_HEADER)
    if tenant is None or not _secret_matches(headers.get(GATEWAY_SECRET_HEADER), secret):
        return None
    salt = headers.get(CACHE_SALT_HEADER)
    return ApiKey(key=f"gateway:{tenant}:{salt}", tenant=tenant, cache_salt=salt)


def mount_replica_api(app: FastAPI, service: Any, hooks: HookSet, secret: str | None) -> None:
    """Add the info and KV-event endpoints to ``app`` and the feed hook to ``hooks``."""
    feed = KVEventFeed()
    hooks.add(feed)
    app.state.kv_event_feed = feed
    info_cache: dict[str, Any] = {}

    def refuse(request: Request) -> JSONResponse | None:
        if secret is None:
            return JSONResponse({"error": {"message": "no trusted gateway is configured",
                                           "type": "not_found"}}, status_code=404)
        if not trusted(request, secret):
            return JSONResponse({"error": {"message": f"{GATEWAY_SECRET_HEADER} is missing or "
                                           "wrong", "type": "permission_error"}}, status_code=403)
        if service.engine is None:
            return JSONResponse({"error": {"message": "the engine is not ready",
                                           "type": "unavailable"}}, status_code=503)
        return None

    @app.get("/servekit/info", include_in_schema=False)
    async def info(request: Request) -> Any:
        refused = refuse(request)
        if refused is not None:
            return refused
        if "doc" not in info_cache:
            info_cache["doc"] = engine_info(service.engine, tuple(service.model_names))
        return {**info_cache["doc"], "epoch": feed.epoch}

    @app.get("/servekit/kv_events", include_in_schema=False)
    async def kv_events(request: Request) -> Any:
        refused = refuse(request)
        if refused is not None:
            return refused
        try:
            after = int(request.query_params.get("after", "-1"))
            timeout = float(request.query_params.get("timeout", "0"))
        except ValueError:
            after, timeout = -2, -1.0
        for name, ok in (("after", after >= -1), ("timeout", 0 <= timeout <= 30)):
            if not ok:
                return JSONResponse({"error": {
                    "message": f"{name} must be an integer >= -1 / seconds in [0, 30], got "
                               f"{request.query_params.get(name)!r}",
                    "type": "invalid_request_error", "param": name, "code": None}},
                    status_code=400)
        events = await feed.wait(after, timeout)
        return {"epoch": feed.epoch, "next_seq": feed.next_seq, "events": events,
                "load": replica_load(service.engine)}
