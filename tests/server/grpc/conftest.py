"""A real grpc.aio server on 127.0.0.1 (a free port), in a background thread with its own loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from attrs import define

from servekit.server.fake import FakeEngine
from servekit.server.grpc import GrpcServer
from servekit.server.keys import ApiKey, KeyStore
from servekit.server.ratelimit import KeyLimits
from servekit.server.service import GenerationService

KEY = "sk-test"
T = TypeVar("T")


@define
class Served:
    """A running server: where to dial it and what to inspect for leaks."""

    address: str
    service: GenerationService
    engine: Any
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's event loop (grpc.aio wants one loop per process)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def used_blocks(self) -> int:
        engine = self.engine
        value = getattr(engine, "num_used_blocks", None)
        if value is not None:
            return int(value)
        kv = engine.engine.kv  # AsyncEngine -> LLMEngine.kv
        return int(kv.num_blocks - kv.num_free_blocks)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no block, reservation or stream is held (cleanup ends just after a call)."""
        deadline = time.monotonic() + timeout
        while True:
            held = (self.used_blocks(), self.service.limits.open_reservations,
                    self.service.state.in_flight)
            if held == (0, 0, 0):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"leaked (blocks, reservations, streams) = {held}")
            time.sleep(0.01)


@contextmanager
def serve(engine: Any = None, keys: list[ApiKey] | None = None, ready: bool = True,
          limits: KeyLimits | None = None, **server_kw: Any) -> Iterator[Served]:
    """Run GrpcServer on ``engine`` (default: an instant FakeEngine) until the block exits."""
    engine = engine if engine is not None else FakeEngine()
    service = GenerationService(engine, keys=KeyStore(keys or ()), limits=limits)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        try:
            async with engine:
                if ready:
                    service.state.set_ready()
                server = GrpcServer(service, health_poll_interval=0.05, **server_kw)
                box["port"] = await server.start()
                started.set()
                await stop.wait()
                await server.stop(0)
        except BaseException as exc:  # surface startup failures to the test
            box["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(30)
    if "error" in box:
        raise box["error"]
    try:
        yield Served(f"127.0.0.1:{box['port']}", service, engine, box["loop"])
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


@pytest.fixture
def served() -> Iterator[Served]:
    with serve() as s:
        yield s


@pytest.fixture
def keyed() -> Iterator[Served]:
    keys = [ApiKey(KEY, tenant="alice"), ApiKey("sk-limited", tenant="bob", rpm=2)]
    with serve(keys=keys) as s:
        yield s
