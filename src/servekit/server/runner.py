"""A uvicorn server that drains before it shuts down.

uvicorn's own shutdown closes the listener at once and, after ``timeout_graceful_shutdown``,
cancels the connections still open: streams end mid-body. :class:`DrainingServer` answers the
first SIGTERM / Ctrl-C with the server's drain instead, while the listener stays open:
``/ready`` answers 503 and new requests get 503 with ``retry-after``; in-flight requests get
the grace period to finish, and the rest end with an error event and a clean end of body. Only
then does uvicorn shut down, with nothing left to cut. A second signal exits at once.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not a client that sends
a request head slowly, or never: :func:`header_timeout_protocol` closes a connection whose
request head has not arrived within ``timeout`` seconds of its start (or of the last response).
"""

from __future__ import annotations

import asyncio
from types import FrameType
from typing import Any

from servekit._optional import require
from servekit.server.lifecycle import Phase, ServerState

require("uvicorn", "server")
import uvicorn  # noqa: E402

__all__ = ["DrainingServer", "header_timeout_protocol"]


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal drains ``state`` for ``grace_period`` s."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_period: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_period = grace_period
        self._drain_requested = False
        self._drain: asyncio.Task[Any] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self.state.phase in (Phase.FAILED, Phase.STOPPED):
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain
            return
        self._drain_requested = True
        self.state.begin_drain()  # /ready turns 503 now; the drain starts at the next tick

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain(self.grace_period)
        finally:
            self.should_exit = True


def header_timeout_protocol(timeout: float) -> type[Any]:
    """uvicorn's httptools protocol, closing connections whose request head is late."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head is due in time too

    return HeaderTimeoutProtocol
