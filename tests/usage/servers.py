"""Real PostgreSQL for the usage tests: Debian's binaries, started by the tests.

``initdb`` / ``pg_ctl`` run as an unprivileged user (the ``postgres`` system user when the
tests run as root) in a temp dir, listening on a free loopback port, trust auth.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

from tests._servers import require_binary


def need_binary(name: str) -> str:
    """A PostgreSQL server binary: Debian keeps them off PATH, under
    /usr/lib/postgresql/<version>/bin; else the one rule of tests/_servers.py (skip, or fail
    under CI=true)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return found[0] if found else require_binary(name, "apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """A PostgreSQL cluster in ``root`` on a free port; :meth:`stop` / :meth:`start` to take
    it down and bring it back (same data)."""

    def __init__(self, root: Path) -> None:
        self.initdb = need_binary("initdb")
        self.pg_ctl = need_binary("pg_ctl")
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            root.parent.chmod(0o755)  # mkdtemp's 0700 would keep the postgres user out
            shutil.chown(root, "postgres", "postgres")
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                "-c fsync=off -c full_page_writes=off")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l",
                  str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def reset(self) -> None:
        """Drop the usage schema (a fresh, empty database for the next test)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS usage, servekit_schema")
