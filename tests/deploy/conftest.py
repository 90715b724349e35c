"""One local Ray for the deploy tests: started once, small, no dashboard, shut down at the end."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests._servers import require_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[tuple[ModuleType, int]]:
    """``(ray.serve, http_port)`` of a local Ray with Serve started on a free port."""
    ray = require_module("ray", "pip install 'servekit[ray]'")
    from ray import serve

    # workers import servekit as this process does: this local Ray's raylet and its workers
    # inherit this process's environment (a worktree's src/ on PYTHONPATH); a runtime_env
    # carrying PYTHONPATH cost serve.start and each deploy about a second more
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield serve, port
    finally:
        serve.shutdown()
        ray.shutdown()
