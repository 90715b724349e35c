from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.usage.servers import Postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL for the session (under /tmp: pytest's own temp root is private to
    root, and the server runs as the postgres user)."""
    root = Path(tempfile.mkdtemp(prefix="servekit-pg-"))
    try:
        server = Postgres(root / "cluster")
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def clickhouse_url() -> Iterator[str]:
    """``clickhouse://`` URL of the chDB-backed HTTP interface (tests/usage/chdb_http.py),
    started in its own process (chDB allows one session per process)."""
    import subprocess
    import sys

    from tests.usage.servers import free_port

    root = Path(tempfile.mkdtemp(prefix="servekit-chhttp-"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.usage.chdb_http", str(port),
                             str(root / "data")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"clickhouse://127.0.0.1:{port}/default"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)
