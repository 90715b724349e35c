"""The gateway's index follows a replica through a restart (new epoch) and dropped events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from servekit.gateway import create_gateway
from servekit.kv.events import BlockStored
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from tests.asgi_server import free_port, serve_asgi

SECRET = "resync"


@contextmanager
def _replica(port: int) -> Iterator[object]:
    """A fake replica on ``port`` (fixed, so a "restart" keeps its URL); yields its app."""
    app = create_app(FakeEngine(), config=ServerConfig(model_names=("fake",),
                                                       gateway_secret=SECRET))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(10)


def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _store(app: object, *hashes: int) -> None:
    feed = app.state.kv_event_feed  # type: ignore[attr-defined]
    feed.on_kv_event(BlockStored(hashes, None, tuple(range(16 * len(hashes))), 16))


def test_restart_resets_the_replicas_index_entry() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = create_gateway([url], secret=SECRET, probe_interval=0.05)
    index = gateway.state.fleet.index
    with serve_asgi(gateway):
        with _replica(port) as first:
            _store(first, 1, 2, 3)
            _until(lambda: index.cached_blocks([1, 2, 3]) == {url: 3}, "events not indexed")
            epoch = gateway.state.fleet.epochs[url]
        with _replica(port) as second:  # same URL, new process: its cache is empty
            _until(lambda: gateway.state.fleet.epochs.get(url) not in (None, epoch),
                   "restart not noticed")
            assert index.cached_blocks([1, 2, 3]) == {}
            _store(second, 7)
            _until(lambda: index.cached_blocks([7]) == {url: 1}, "new events not indexed")
            assert index.last_seq(url) == 0


def test_dropped_events_reset_the_entry() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _replica(port) as replica:
        feed = replica.state.kv_event_feed  # type: ignore[attr-defined]
        feed._events = type(feed._events)(maxlen=2)  # a tiny buffer, so events fall out
        feed._lock = threading.RLock()  # lets the test store several events atomically
        gateway = create_gateway([url], secret=SECRET, probe_interval=0.05)
        index = gateway.state.fleet.index
        with serve_asgi(gateway):
            _store(replica, 1)
            _until(lambda: index.cached_blocks([1]) == {url: 1}, "events not indexed")
            with feed._lock:  # no poll in between: event 1 falls out before anyone reads it
                for h in (2, 3, 4):
                    _store(replica, h)
            _until(lambda: index.resets.get(url, 0) >= 2, "gap not detected", timeout=15)
            assert index.cached_blocks([1]) == {}
            assert index.blocks(url) == frozenset({3, 4})
