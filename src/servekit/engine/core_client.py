"""A front end's handle on an engine core in another process (the ``EngineLike`` contract).

``EngineCoreClient(factory, tokenizer=...)`` starts :func:`~servekit.engine.core_process.run_core`
in a process of its own on ``async with`` (or connects to a running core's ``address``) and
then behaves like an :class:`~servekit.engine.AsyncEngine`: ``generate`` is an async iterator
of :class:`RequestOutput` deltas (errors raised as the same types: ``QueueFullError`` with its
``retry_after``, ``InvalidParameterError`` naming the field, ...), leaving it early aborts the
request in the core, ``abort`` ends a request with ``abort``. The tokenizer lives here, in the
front end, which tokenizes prompts as before; the core detokenizes and matches stop strings.

A core that exits or stops answering for ``core_timeout`` seconds fails every request in flight
with :class:`EngineClosedError` naming what happened, and every later ``generate``;
:meth:`wait_failed` returns then (the server turns ``/ready`` to 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from servekit._optional import require
from servekit.engine.async_engine import EngineClosedError, OutputQueue
from servekit.engine.core_process import ENGINE_EVENTS, EngineFactory
from servekit.engine.outputs import RequestOutput, merge_outputs
from servekit.engine.wire import error_from_wire, output_from_wire, params_to_wire
from servekit.metrics.hooks import HookSet
from servekit.sched.errors import DuplicateRequestError
from servekit.sched.params import SamplingParams

require("zmq", "engine-process")
require("msgpack", "engine-process")
import msgpack  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

__all__ = ["EngineCoreClient", "spawn_core", "stop_core"]

logger = logging.getLogger("servekit.engine")


def spawn_core(factory: EngineFactory, address: str, *, forward_events: Sequence[str] = (),
               log_level: str = "INFO", frontend_timeout: float = 5.0) -> subprocess.Popen[bytes]:
    """Start :func:`~servekit.engine.core_process.run_core` in a fresh interpreter (not
    multiprocessing's spawn, which re-runs the parent's ``__main__``), serving ``address``;
    it exits when this process does."""
    payload = pickle.dumps((factory, address, {
        "forward_events": tuple(forward_events), "parent_pid": os.getpid(),
        "log_level": log_level, "frontend_timeout": frontend_timeout}))
    proc = subprocess.Popen([sys.executable, "-m", "servekit.engine.core_process"],
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    logger.info("engine core process started (pid %d)", proc.pid)
    return proc


def stop_core(address: str) -> None:
    """Ask the core serving ``address`` to stop (it aborts what runs and exits)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(msgpack.packb(["shutdown"]))
    sock.close(linger=1000)  # until the message is out
    ctx.term()


class EngineCoreClient:
    """The ``EngineLike`` a server uses when the engine core runs in its own process.

    ``factory(hooks)`` builds the engine in the core process (it must pickle: a module-level
    function or a ``functools.partial`` of one); ``address`` connects to a core started
    elsewhere instead. ``hooks`` receive the engine's metrics events, forwarded from the core.
    A core started here aborts the requests of a front end it has not heard from for
    ``frontend_timeout`` seconds (each sends a heartbeat every ``heartbeat_interval``).
    """

    def __init__(self, factory: EngineFactory | None = None, *, tokenizer: Any,
                 address: str | None = None, hooks: HookSet | None = None,
                 startup_timeout: float = 300.0, heartbeat_interval: float = 0.2,
                 core_timeout: float = 10.0, frontend_timeout: float = 5.0,
                 log_level: str = "INFO") -> None:
        if (factory is None) == (address is None):
            raise TypeError("pass either a factory (start a core) or an address (connect to one)")
        self.tokenizer = tokenizer
        self._factory = factory
        self.address = address
        self._hooks = hooks
        self._startup_timeout = startup_timeout
        self._interval = heartbeat_interval
        self._core_timeout = core_timeout
        self._frontend_timeout = frontend_timeout
        self._log_level = log_level
        self.info: dict[str, Any] = {}
        self.load: dict[str, Any] = {}
        self._queues: dict[str, OutputQueue] = {}
        self._errors: dict[str, BaseException] = {}
        self._failure: EngineClosedError | None = None
        self._failed = anyio.Event()
        self._ids = itertools.count()
        self._proc: Any = None
        self._tmp: str | None = None
        self._ctx: Any = None
        self._sock: Any = None
        self._tg: TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heard = 0.0

    # -- what the server reads -----------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The served model's name (the core's)."""
        return str(self.info["model_name"])

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""
        return int(self.info["max_model_len"])

    @property
    def coalesces_outputs(self) -> bool:
        """Whether ``generate`` merges deltas a slow consumer fell behind on (``coalesce``):
        as the core's engine does (the AsyncEngine does; the fake engine does not)."""
        return bool(self.info.get("coalesces_outputs", False))

    @property
    def block_size(self) -> int:
        """KV block size of the core's cache, tokens."""
        return int(self.info.get("block_size", 16))

    @property
    def prefix_caching(self) -> bool:
        """Whether the core's engine caches prompt prefixes."""
        return bool(self.info.get("prefix_caching", False))

    @property
    def admission_capacity(self) -> int | None:
        """Requests the core can hold at once (running slots + waiting bound), if bounded."""
        capacity = self.info.get("admission_capacity")
        return None if capacity is None else int(capacity)

    @property
    def num_used_blocks(self) -> int:
        """KV blocks held by live requests, as of the core's last heartbeat."""
        return int(self.load.get("used_blocks", 0))

    @property
    def num_live_requests(self) -> int:
        """Requests waiting or running in the core, as of its last heartbeat."""
        return int(self.load.get("live", 0))

    @property
    def core_pid(self) -> int | None:
        """The core process's id."""
        pid = self.info.get("pid")
        return None if pid is None else int(pid)

    @property
    def failure(self) -> EngineClosedError | None:
        """Why the core is gone (None while it serves)."""
        return self._failure

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> EngineCoreClient:
        if self._tg is not None:
            raise EngineClosedError("this EngineCoreClient is already running")
        self._loop = asyncio.get_running_loop()
        if self._factory is not None:
            self._spawn()
        self._ctx = zmq.asyncio.Context()
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        try:
            await self._handshake()
        except BaseException:
            await self._close(stop_core=True)
            raise
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._read)
        tg.start_soon(self._watch)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close(stop_core=True)

    def _spawn(self) -> None:
        assert self._factory is not None
        self._tmp = tempfile.mkdtemp(prefix="servekit-core-")  # 0700: only this user connects
        self.address = f"ipc://{self._tmp}/engine.sock"
        wanted: tuple[str, ...] = ()
        if self._hooks is not None:
            wanted = tuple(m for m in ENGINE_EVENTS if getattr(self._hooks.wants, m[3:]))
        self._proc = spawn_core(self._factory, self.address, forward_events=wanted,
                                log_level=self._log_level,
                                frontend_timeout=self._frontend_timeout)

    async def _handshake(self) -> None:
        self._send(["hello"])
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if await self._sock.poll(100):
                msg = msgpack.unpackb(await self._sock.recv())
                if msg[0] == "info":
                    self.info = msg[1]
                    self._heard = time.monotonic()
                    return
                if msg[0] == "fail":
                    raise EngineClosedError(f"the engine core failed to start: {msg[1]}")
            code = self._exitcode()
            if code is not None:
                raise EngineClosedError(f"the engine core process exited while starting "
                                        f"(exit code {code})")
            if time.monotonic() > deadline:
                raise EngineClosedError(f"the engine core did not answer within "
                                        f"{self._startup_timeout:g} s")

    async def _close(self, stop_core: bool) -> None:
        self._fail_all(self._failure or EngineClosedError("the engine core client is closed"),
                       log=False)
        proc = self._proc
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._send(["shutdown"] if stop_core and proc is not None else ["bye"])
            await anyio.sleep(0.05)  # let the message reach the core before the socket goes
            self._sock.close(linger=0)
            self._ctx.term()
            self._sock = None
        if proc is not None:
            try:
                await anyio.to_thread.run_sync(proc.wait, 10.0)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not stop in 10 s: killing it")
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait, 5.0)
            self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def wait_failed(self) -> str:
        """Wait until the core is gone (crashed or stopped answering); returns why."""
        await self._failed.wait()
        return str(self._failure)

    # -- requests ------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        deadline: float | None = None,
        coalesce: bool = False,
        output_token_ids: Sequence[int] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's deltas from the core; the last has ``finished=True``.

        As :meth:`AsyncEngine.generate <servekit.engine.AsyncEngine.generate>`: errors at the
        first iteration, ``coalesce`` merges deltas that queued while the consumer was busy,
        leaving the iteration early aborts the request.
        """
        if self._tg is None:
            raise EngineClosedError("the EngineCoreClient is not running: use 'async with'")
        if self._failure is not None:
            raise EngineClosedError(str(self._failure))
        rid = request_id if request_id is not None else f"core-{next(self._ids)}"
        if rid in self._queues:
            raise DuplicateRequestError(rid)
        queue = self._queues[rid] = OutputQueue(self._loop)
        self._send(["gen", rid, prompt if isinstance(prompt, str) else list(prompt),
                    params_to_wire(params or SamplingParams()), tenant, priority, cache_salt,
                    deadline, list(output_token_ids)])
        done = False
        try:
            while not done:
                batch = await queue.get_batch()
                if not batch:
                    break
                if coalesce and len(batch) > 1:
                    batch = [merge_outputs(batch)]
                for out in batch:
                    done = out.finished
                    yield out
            if not done:
                error = self._errors.pop(rid, None)
                if error is None and self._failure is not None:
                    error = EngineClosedError(str(self._failure))
                if error is not None:
                    raise error
        finally:
            if self._queues.get(rid) is queue:
                del self._queues[rid]
            self._errors.pop(rid, None)
            if not done and self._failure is None and self._sock is not None:
                self._send(["abort", rid])

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); its stream ends with ``abort``."""
        if self._failure is None and self._sock is not None:
            self._send(["abort", request_id])

    # -- the channel ---------------------------------------------------------------------

    def _send(self, msg: list[Any]) -> None:
        # DEALER with no high-water mark: the send is queued at once and never blocks
        self._sock.send(msgpack.packb(msg), flags=zmq.NOBLOCK)

    async def _read(self) -> None:
        sock, unpack = self._sock, msgpack.unpackb
        queues, errors = self._queues, self._errors
        while True:
            msg = unpack(await sock.recv())
            self._heard = time.monotonic()
            kind = msg[0]
            if kind == "b":
                _, outputs, failed, events = msg
                for item in outputs:
                    queue = queues.get(item[0])
                    if queue is None:
                        continue  # its consumer left: the core is aborting it
                    out = output_from_wire(item)
                    queue.put(out)
                    if out.finished:
                        del queues[out.request_id]
                        queue.close()
                for rid, error in failed:
                    queue = queues.pop(rid, None)
                    if queue is not None:
                        errors[rid] = error_from_wire(error)
                        queue.close()
                if events is not None and self._hooks is not None:
                    hooks = self._hooks
                    for name, event in pickle.loads(events):
                        getattr(hooks, name)(event)
            elif kind == "pong":
                self.load = msg[1]

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            code = self._exitcode()
            if code is not None:
                self._fail(f"the engine core process exited (exit code {code}); the request "
                           "could not finish")
                return
            silent = time.monotonic() - self._heard
            if silent > self._core_timeout:
                self._fail(f"the engine core stopped answering ({silent:.1f} s without a "
                           "heartbeat); the request could not finish")
                return
            self._send(["ping"])

    def _exitcode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()  # type: ignore[no-any-return]

    def _fail(self, message: str) -> None:
        logger.error("%s", message)
        self._failure = EngineClosedError(message)
        self._fail_all(self._failure)
        self._failed.set()

    def _fail_all(self, error: BaseException, log: bool = True) -> None:
        if log and self._queues:
            logger.error("failing %d request(s) in flight: %s", len(self._queues), error)
        for rid, queue in list(self._queues.items()):
            self._errors[rid] = type(error)(str(error))  # one instance per request raising it
            queue.close()
        self._queues.clear()
