"""Run ``servekit serve`` as a real process on 127.0.0.1, keeping everything it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def run_clis(*argvs: Sequence[str], timeout: float = 120.0
             ) -> list[subprocess.CompletedProcess[str]]:
    """Run ``servekit ARGS`` to completion for each argument list, as many at once as there
    are CPUs (their imports overlap; more would only contend), for commands that end, or fail,
    at once; the timeout only guards against a hang: importing torch on a loaded 2-core
    machine takes seconds."""
    def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "servekit.server.cli", *args],
                              capture_output=True, text=True, timeout=timeout, env=_env())

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(run, argvs))


@contextmanager
def cli_server(*args: str, ready_timeout: float = 120.0,
               port: int | None = None) -> Iterator[CliServer]:
    """``servekit serve ARGS --port <free>`` (or ``port``: a restart keeps its URL), until
    /ready answers 200; killed on exit."""
    with cli_servers(args, ready_timeout=ready_timeout,
                     ports=None if port is None else [port]) as (server,):
        yield server


@contextmanager
def cli_servers(*argvs: Sequence[str], ready_timeout: float = 120.0,
                ports: Sequence[int] | None = None) -> Iterator[list[CliServer]]:
    """One ``servekit serve`` per argument list, as :func:`cli_server`, all started at once:
    their imports (torch, seconds each) overlap instead of queueing."""
    ports = list(ports) if ports is not None else _free_ports(len(argvs))
    servers: list[CliServer] = []
    try:
        for args, port in zip(argvs, ports, strict=True):
            proc = subprocess.Popen(
                [sys.executable, "-m", "servekit.server.cli", "serve", *args,
                 "--port", str(port)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
            servers.append(CliServer(proc, f"http://127.0.0.1:{port}"))
        deadline = time.monotonic() + ready_timeout
        for server in servers:
            _wait_ready(server, deadline)
        yield servers
    finally:
        for server in servers:
            server.proc.kill()
        for server in servers:
            server.proc.wait(timeout=30)


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:  # two free_port() calls may hand out the same port
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _wait_ready(server: CliServer, deadline: float) -> None:
    proc = server.proc
    while True:
        if proc.poll() is not None:
            server._reader.join(timeout=5)
            raise AssertionError(f"servekit serve exited with {proc.returncode}:\n"
                                 f"{server.output()}")
        try:
            if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"servekit serve not ready:\n{server.output()}")
        time.sleep(0.1)


_DATA_DIR = tempfile.mkdtemp(prefix="servekit-test-data-")


def _env() -> dict[str, str]:
    # usage records go to a scratch data directory, never the user's ~/.local/share/servekit
    env = {"SERVEKIT_DATA_DIR": _DATA_DIR, **os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SERVEKIT_API_KEYS", None)
    return env
