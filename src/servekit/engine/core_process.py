"""The engine core in its own process: one engine served to front ends over ZMQ with msgpack.

:func:`run_core` is the process's entry point (``servekit serve --engine-process`` starts it with
:class:`~servekit.engine.core_client.EngineCoreClient`). It builds the engine with the given
factory, binds a ROUTER socket and serves every front end (a DEALER each) that connects:

==========================================  ==============================================
front end -> core                           core -> front end
==========================================  ==============================================
``["hello"]``                               ``["info", {model_name, max_model_len, ...}]``
``["gen", rid, prompt, params, tenant,      ``["b", outputs, errors, events]``: every delta
priority, cache_salt, deadline, resume]``   and error made since the last batch, one
                                            message per pass of the event loop
``["abort", rid]``                          (the request ends with ``abort``, as in process)
``["ping"]``                                ``["pong", load]``
``["bye"]`` / ``["shutdown"]``              (its requests aborted / the core exits)
==========================================  ==============================================

Each request runs as the engine's own ``generate`` (so scheduling, detokenization and stop
strings stay in the core), its deltas batched per front end. Metrics events the front end
listens to are forwarded (pickled, in the batch) so its hooks, Prometheus exporter and KV-event
feed see them as in process. A front end silent for ``frontend_timeout`` seconds (it crashed)
has its requests aborted; the core exits when its parent process dies or on ``shutdown``. It
ignores SIGINT and SIGTERM: the front end that started it drains first, then stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from servekit._optional import require
from servekit.engine.wire import (
    error_to_wire,
    output_to_wire,
    params_from_wire,
)
from servekit.metrics.hooks import EVENT_METHODS, Hook, HookSet
from servekit.sched.errors import DuplicateRequestError

require("zmq", "engine-process")
require("msgpack", "engine-process")
import msgpack  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

__all__ = ["ENGINE_EVENTS", "EngineCore", "EventForwarder", "engine_load", "run_core"]

logger = logging.getLogger("servekit.engine")

#: The hook events an engine emits (the rest come from the front end's own parts).
ENGINE_EVENTS = tuple(m for m in EVENT_METHODS if m not in (
    "on_rate_limit", "on_route", "on_resource_gauge"))

#: Seconds between checks that the parent process and the front ends are alive.
_SWEEP_INTERVAL = 0.5

EngineFactory = Callable[[HookSet], Any]


class EventForwarder(Hook):
    """Collects the events named in ``names`` for the next batch (from any thread)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.events: deque[tuple[str, Any]] = deque()
        for name in names:
            if name in ENGINE_EVENTS:
                setattr(self, name, self._collector(name))

    def _collector(self, name: str) -> Callable[[Any], None]:
        events = self.events

        def collect(event: Any) -> None:
            events.append((name, event))

        return collect

    def take(self) -> list[tuple[str, Any]]:
        """The events collected so far, removed (``popleft`` is atomic: safe beside a producer
        thread)."""
        events, taken = self.events, []
        while events:
            taken.append(events.popleft())
        return taken


def engine_load(engine: Any) -> dict[str, Any]:
    """What the front ends' gauges and the replica API read: running, waiting, KV usage,
    KV blocks held and live requests, from an AsyncEngine or the fake engine."""
    llm = getattr(engine, "engine", None)  # AsyncEngine -> LLMEngine
    sched = getattr(llm, "scheduler", None)
    if sched is not None:
        kv = llm.kv  # type: ignore[union-attr]
        running, waiting = int(sched.num_running), int(sched.num_waiting)
        return {"running": running, "waiting": waiting, "kv_usage": float(kv.usage),
                "used_blocks": int(kv.num_blocks - kv.num_free_blocks),
                "live": running + waiting}
    live = int(getattr(engine, "num_live_requests", 0) or 0)
    return {"running": live, "waiting": 0, "kv_usage": 0.0,
            "used_blocks": int(getattr(engine, "num_used_blocks", 0) or 0), "live": live}


def engine_summary(engine: Any) -> dict[str, Any]:
    """The ``info`` reply: what a front end needs to know of the engine besides its tokenizer."""
    llm = getattr(engine, "engine", None)
    config = getattr(llm, "config", None)
    capacity = getattr(engine, "admission_capacity", None)
    sched = getattr(llm, "scheduler", None)
    if capacity is None and sched is not None and sched.max_waiting_requests is not None:
        capacity = int(sched.max_num_seqs) + int(sched.max_waiting_requests)
    return {
        "model_name": engine.model_name, "max_model_len": int(engine.max_model_len),
        "block_size": int(getattr(config, "block_size", None)
                          or getattr(engine, "block_size", None) or 16),
        "prefix_caching": bool(getattr(config, "enable_prefix_caching", False)),
        "admission_capacity": capacity, "pid": os.getpid(),
        "coalesces_outputs": bool(getattr(engine, "coalesces_outputs", False)),
    }


class EngineCore:
    """Serves ``engine`` (entered already) on a bound ROUTER ``socket`` until :meth:`stop`."""

    def __init__(self, engine: Any, socket: Any, *, forwarder: EventForwarder | None = None,
                 frontend_timeout: float = 5.0, parent_pid: int | None = None) -> None:
        self.engine = engine
        self._sock = socket
        self._forwarder = forwarder
        self._frontend_timeout = frontend_timeout
        self._parent_pid = parent_pid
        self._coalesce = bool(getattr(engine, "coalesces_outputs", False))
        #: request id -> (front end identity, its task)
        self._requests: dict[str, tuple[bytes, asyncio.Task[None]]] = {}
        self._outbox: dict[bytes, tuple[list[Any], list[Any]]] = {}
        self._seen: dict[bytes, float] = {}
        self._flush_pending = False
        self._stopped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @property
    def num_requests(self) -> int:
        """Requests in flight (any front end)."""
        return len(self._requests)

    def stop(self) -> None:
        """Make :meth:`serve` return."""
        self._stopped.set()

    async def serve(self) -> None:
        """Answer front ends until :meth:`stop` (or ``shutdown``); then abort what is left."""
        receiver = asyncio.ensure_future(self._receive())
        sweeper = asyncio.ensure_future(self._sweep())
        try:
            await self._stopped.wait()
        finally:
            receiver.cancel()
            sweeper.cancel()
            for task in [t for _, t in self._requests.values()]:
                task.cancel()
            await asyncio.gather(receiver, sweeper, *(t for _, t in self._requests.values()),
                                 return_exceptions=True)
            self._flush()

    async def _receive(self) -> None:
        sock, unpack = self._sock, msgpack.unpackb
        while True:
            ident, payload = await sock.recv_multipart(copy=True)
            self._seen[ident] = time.monotonic()
            try:
                self._handle(ident, unpack(payload))
            except Exception:  # a bad message must not stop the core
                logger.exception("engine core: bad message from a front end")

    def _handle(self, ident: bytes, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "gen":
            self._start(ident, msg)
        elif kind == "abort":
            entry = self._requests.get(msg[1])
            if entry is not None and entry[0] == ident:
                self._loop.create_task(self._abort(msg[1]))
        elif kind == "ping":
            self._reply(ident, ["pong", engine_load(self.engine)])
        elif kind == "hello":
            self._reply(ident, ["info", engine_summary(self.engine)])
        elif kind == "bye":
            self._forget(ident)
        elif kind == "shutdown":
            self.stop()

    def _start(self, ident: bytes, msg: list[Any]) -> None:
        rid = msg[1]
        if rid in self._requests:
            self._queue_error(ident, rid, DuplicateRequestError(rid))
            return
        task = self._loop.create_task(self._run(ident, rid, msg))
        self._requests[rid] = (ident, task)

    async def _run(self, ident: bytes, rid: str, msg: list[Any]) -> None:
        _, _, prompt, params, tenant, priority, cache_salt, deadline, resume = msg
        extra: dict[str, Any] = {"coalesce": True} if self._coalesce else {}
        if resume:
            extra["output_token_ids"] = resume
        try:
            sampling = params_from_wire(params)
            grammars = getattr(getattr(self.engine, "engine", None), "grammars", None)
            if sampling.guided is not None and grammars is not None:
                # compiled off the loop (cached by spec), as the in-process server does before
                # admission: a slow compile must not stall every other stream
                await anyio.to_thread.run_sync(grammars.compile, sampling.guided)
            stream = self.engine.generate(
                prompt, sampling, request_id=rid, tenant=tenant,
                priority=priority, cache_salt=cache_salt, deadline=deadline, **extra)
            async for out in stream:
                self._queue_output(ident, output_to_wire(out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue_error(ident, rid, exc)
        finally:
            self._requests.pop(rid, None)

    async def _abort(self, rid: str) -> None:
        with contextlib.suppress(KeyError, Exception):
            await self.engine.abort(rid)

    def _forget(self, ident: bytes) -> None:
        """A front end left (or went silent): abort its requests."""
        self._seen.pop(ident, None)
        self._outbox.pop(ident, None)
        for rid, (owner, task) in list(self._requests.items()):
            if owner == ident:
                task.cancel()  # leaving generate aborts the request in the engine
                self._requests.pop(rid, None)

    # -- sending -------------------------------------------------------------------------

    def _box(self, ident: bytes) -> tuple[list[Any], list[Any]]:
        box = self._outbox.get(ident)
        if box is None:
            box = self._outbox[ident] = ([], [])
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)
        return box

    def _queue_output(self, ident: bytes, item: list[Any]) -> None:
        self._box(ident)[0].append(item)

    def _queue_error(self, ident: bytes, rid: str, exc: BaseException) -> None:
        self._box(ident)[1].append([rid, error_to_wire(exc)])

    def _flush(self) -> None:
        self._flush_pending = False
        events = None
        if self._forwarder is not None and self._forwarder.events:
            events = pickle.dumps(self._forwarder.take(), protocol=pickle.HIGHEST_PROTOCOL)
            for ident in self._seen:  # every front end sees every engine event
                self._outbox.setdefault(ident, ([], []))
        outbox, self._outbox = self._outbox, {}
        pack, send = msgpack.packb, self._sock.send_multipart
        for ident, (outputs, errors) in outbox.items():
            send([ident, pack(["b", outputs, errors, events])], copy=False)

    def _reply(self, ident: bytes, msg: list[Any]) -> None:
        self._sock.send_multipart([ident, msgpack.packb(msg)])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                logger.warning("engine core: the front end that started it is gone; exiting")
                self.stop()
                return
            now = time.monotonic()
            for ident, seen in list(self._seen.items()):
                if now - seen > self._frontend_timeout:
                    logger.warning("engine core: a front end was silent for %.1f s; aborting "
                                   "its requests", now - seen)
                    self._forget(ident)
            if self._forwarder is not None and self._forwarder.events and self._seen:
                self._flush()  # events emitted off the loop, with no delta to carry them


def run_core(factory: EngineFactory, address: str, *, forward_events: Sequence[str] = (),
             parent_pid: int | None = None, frontend_timeout: float = 5.0,
             log_level: str = "INFO") -> None:
    """The engine-core process: build the engine with ``factory(hooks)`` and serve it on
    ``address`` (e.g. ``ipc:///tmp/x/core``) until told to stop or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    options: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        options["use_uvloop"] = True
    anyio.run(_main, factory, address, tuple(forward_events), parent_pid, frontend_timeout,
              backend="asyncio", backend_options=options)


async def _main(factory: EngineFactory, address: str, forward_events: tuple[str, ...],
                parent_pid: int | None, frontend_timeout: float) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(address)
    try:
        forwarder = EventForwarder(forward_events) if forward_events else None
        try:
            engine = await anyio.to_thread.run_sync(
                factory, HookSet([forwarder] if forwarder is not None else []))
        except Exception as exc:
            logger.exception("engine core: building the engine failed")
            await _refuse(sock, f"{type(exc).__name__}: {exc}")
            raise SystemExit(1) from None
        async with engine:
            core = EngineCore(engine, sock, forwarder=forwarder,
                              frontend_timeout=frontend_timeout, parent_pid=parent_pid)
            logger.info("engine core serving %s on %s (pid %d)", engine.model_name, address,
                        os.getpid())
            await core.serve()
    finally:
        sock.close()
        ctx.term()


def _entry() -> None:
    """``python -m servekit.engine.core_process``: ``(factory, address, keywords)`` pickled on
    stdin, then :func:`run_core` (a fresh interpreter: nothing of the parent's ``__main__``)."""
    factory, address, kwargs = pickle.loads(sys.stdin.buffer.read())
    run_core(factory, address, **kwargs)


async def _refuse(sock: Any, message: str, wait: float = 10.0) -> None:
    """Tell the front ends that say hello in the next ``wait`` s why there is no engine."""
    with anyio.move_on_after(wait):
        while True:
            ident, _ = await sock.recv_multipart()
            sock.send_multipart([ident, msgpack.packb(["fail", message])])
            await anyio.sleep(0.2)  # let it go out before the process ends
            return


if __name__ == "__main__":
    _entry()
