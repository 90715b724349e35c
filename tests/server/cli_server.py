"""Run ``servekit serve`` as a real process on 127.0.0.1, keeping everything it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.server.conftest import free_port


class CliServer:
    """A ``servekit serve`` child process: ``url``, ``output()`` (all it printed so far)."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    def output(self) -> str:
        return "".join(self._lines)

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not printed; output:\n{self.output()}")
            time.sleep(0.05)
        return self.output()


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``servekit ARGS`` to completion (for commands that end, or fail, at once; the
    timeout only guards against a hang: importing torch on a loaded 2-core machine takes seconds)."""
    return subprocess.run([sys.executable, "-m", "servekit.server.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())


@contextmanager
def cli_server(*args: str, ready_timeout: float = 120.0,
               port: int | None = None) -> Iterator[CliServer]:
    """``servekit serve ARGS --port <free>`` (or ``port``: a restart keeps its URL), until
    /ready answers 200; killed on exit."""
    port = free_port() if port is None else port
    proc = subprocess.Popen(
        [sys.executable, "-m", "servekit.server.cli", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    server = CliServer(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                server._reader.join(timeout=5)
                raise AssertionError(f"servekit serve exited with {proc.returncode}:\n"
                                     f"{server.output()}")
            try:
                if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"servekit serve not ready:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.kill()
        proc.wait(timeout=30)


_DATA_DIR = tempfile.mkdtemp(prefix="servekit-test-data-")


def _env() -> dict[str, str]:
    # usage records go to a scratch data directory, never the user's ~/.local/share/servekit
    env = {"SERVEKIT_DATA_DIR": _DATA_DIR, **os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SERVEKIT_API_KEYS", None)
    return env
