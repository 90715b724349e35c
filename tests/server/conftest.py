"""Run the real server on 127.0.0.1 (a free port) in a thread, for tests with real clients."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """A server running in a thread: ``url``, ``app``, and ``stop()``."""

    def __init__(self, app: Any, server: uvicorn.Server, thread: threading.Thread, port: int):
        self.app, self.server, self.thread = app, server, thread
        self.url = f"http://127.0.0.1:{port}"

    @property
    def service(self) -> Any:
        return self.app.state.servekit

    def metric(self, name: str) -> float:
        """One unlabelled-by-tenant gauge/counter value from /metrics (sum over series)."""
        text = httpx.get(self.url + "/metrics").text
        values = [float(m.group(1)) for m in re.finditer(
            rf"^servekit_{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        assert values, f"{name} not in /metrics"
        return sum(values)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[Running]:
    """Start ``app`` under uvicorn on a free loopback port; wait until /ready; stop on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = Running(app, server, thread, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(running.url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    else:
        running.stop()
        raise TimeoutError("server did not become ready")
    try:
        yield running
    finally:
        running.stop()


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def fake_server() -> Iterator[Running]:
    from servekit.server import FakeEngine, create_app

    with serve(create_app(FakeEngine(max_model_len=256))) as running:
        yield running
