"""The server's lifecycle: starting -> ready -> draining -> stopped, and its in-flight work.

:class:`ServerState` is what ``/ready`` reports and what admission consults. Each generation
runs inside :meth:`ServerState.track`, a cancel scope the state knows about, so :meth:`drain`
can stop accepting, let in-flight requests finish for a grace period, then cancel the rest
(their engine requests are aborted and their rate-limit reservations settled on the way out).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from servekit.protocol.errors import ServiceUnavailableError

__all__ = ["Phase", "ServerState"]

logger = logging.getLogger("servekit.server")


class Phase(enum.Enum):
    """Where the server is in its life."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ServerState:
    """Phase, in-flight generations and the counters a leak check reads."""

    def __init__(self, retry_after: float = 1.0) -> None:
        self.phase = Phase.STARTING
        self.error: str | None = None
        self.retry_after = retry_after
        self._scopes: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None

    @property
    def ready(self) -> bool:
        """True when new requests are accepted."""
        return self.phase is Phase.READY

    @property
    def in_flight(self) -> int:
        """Generations running now (streams open or responses being built)."""
        return len(self._scopes)

    def check_accepting(self) -> None:
        """Raise 503 (with retry-after) unless the server is ready."""
        if self.phase is Phase.FAILED:
            raise ServiceUnavailableError(f"the engine failed ({self.error}); retry on another "
                                          "replica", retry_after=self.retry_after,
                                          code="engine_failed")
        if self.phase is not Phase.READY:
            code = "draining" if self.phase in (Phase.DRAINING, Phase.STOPPED) else "starting"
            raise ServiceUnavailableError(f"the server is {self.phase.value}; retry on another replica "
                                  "or later", retry_after=self.retry_after, code=code)

    def set_ready(self) -> None:
        """Startup finished: accept requests."""
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def set_failed(self, error: str) -> None:
        """Startup failed, or the engine died (its core process): not ready, not live."""
        self.phase = Phase.FAILED
        self.error = error

    def begin_drain(self) -> None:
        """Stop accepting new requests (``/ready`` turns false); in-flight ones continue."""
        if self.phase in (Phase.STARTING, Phase.READY):
            logger.info("draining: %d request(s) in flight", self.in_flight)
            self.phase = Phase.DRAINING

    async def drain(self, grace_period: float) -> int:
        """Stop accepting, wait up to ``grace_period`` s for in-flight work, cancel the rest.

        Returns how many generations were cancelled.
        """
        self.begin_drain()
        if self._scopes:
            self._idle = anyio.Event()
            with anyio.move_on_after(grace_period):
                await self._idle.wait()
        cancelled = len(self._scopes)
        for scope in list(self._scopes):
            scope.cancel()
        if cancelled:
            logger.warning("grace period over: cancelled %d request(s)", cancelled)
        self.phase = Phase.STOPPED
        return cancelled

    @contextmanager
    def track(self) -> Iterator[anyio.CancelScope]:
        """Run one generation in a cancel scope that :meth:`drain` may cancel."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
                if not self._scopes and self._idle is not None:
                    self._idle.set()
