"""``servekit serve --engine-process --api-processes N``: N front ends sharing one engine core.

This process supervises: it starts the engine core (its own process, as ``--engine-process``)
and N ``servekit serve`` front-end processes with the same arguments plus the core's address;
each front end binds the port with ``SO_REUSEPORT`` (the kernel spreads connections over
them), tokenizes, limits and streams on its own, and connects its own DEALER to the core. The
first SIGTERM / Ctrl-C is passed to every front end (each drains as usual), then the core is
stopped; a second one is passed on too (they exit at once).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from servekit.engine.core_client import spawn_core, stop_core
from servekit.engine.core_process import ENGINE_EVENTS

__all__ = ["serve_many"]

logger = logging.getLogger("servekit.server")


def serve_many(args: argparse.Namespace, argv: Sequence[str],
               factory: Callable[[Any], Any]) -> int:
    """Run ``args.api_processes`` front ends (``argv`` is this command's own) on one core built
    by ``factory``; returns when every front end has exited."""
    tmp = tempfile.mkdtemp(prefix="servekit-core-")
    address = f"ipc://{tmp}/engine.sock"
    core = spawn_core(factory, address, forward_events=ENGINE_EVENTS, log_level=args.log_level)
    command = [sys.executable, "-m", "servekit.server.cli", *argv, "--engine-address", address]
    workers = [subprocess.Popen(command) for _ in range(args.api_processes)]
    logger.info("%d front-end processes (pids %s) on engine core %d", len(workers),
                ", ".join(str(w.pid) for w in workers), core.pid)

    def forward(sig: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    reported = False
    try:
        while any(w.poll() is None for w in workers):
            time.sleep(0.2)
            if core.poll() is not None and not reported:
                reported = True
                logger.error("the engine core exited (exit code %s); the front ends fail their "
                             "requests and turn /ready to 503", core.returncode)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:  # only if this process itself is being torn down early
            if worker.poll() is None:
                worker.kill()
        if core.poll() is None:
            stop_core(address)
            try:
                core.wait(10)
            except subprocess.TimeoutExpired:
                core.kill()
                core.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    codes = [w.returncode for w in workers]
    logger.info("front ends exited (%s)", ", ".join(map(str, codes)))
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


def reuse_port_socket(host: str, port: int) -> Any:
    """A listening TCP socket on ``host:port`` that other processes may bind too."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
