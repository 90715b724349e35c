"""Messages waiting for a call's writer, with deltas merged while a write is in flight.

A grpc.aio ``write`` returns only when the message is on its way, one event-loop round trip
per message. Writing each engine delta in the generating task would tie generation to the
slowest reader and pay that round trip per token. Instead the generating side ``put``s deltas
here without waiting for the wire, and one writer task drains the queue; while a write is in
flight, further deltas of the same choice join the entry already queued for it, and are merged
by the engine's own :func:`~servekit.engine.outputs.merge_outputs` (the one merge the HTTP path
uses too) and encoded when the writer takes them. A reader that keeps up gets one chunk per
delta; a slower one gets fewer, larger chunks — an adaptive version of vLLM's and SGLang's
``stream_interval``. Nothing a chunk counts is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio

from servekit.engine.outputs import RequestOutput, merge_outputs

__all__ = ["Outbox"]


class _Deltas:
    """Queued deltas of one choice, encoded into one message when taken."""

    __slots__ = ("encode", "outputs")

    def __init__(self, out: RequestOutput, encode: Callable[[RequestOutput], Any]) -> None:
        self.outputs = [out]
        self.encode = encode

    def message(self) -> Any:
        return self.encode(merge_outputs(self.outputs))


class Outbox:
    """A queue of messages for one writer; see the module docstring.

    :meth:`put` waits only while more than ``limit`` messages are queued (and then after the
    message is queued, so a cancelled producer never loses what it counted).
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._queue: deque[Any] = deque()
        self._open: dict[Hashable, _Deltas] = {}  # key -> queued entry later deltas join
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self._closed = False

    async def put_delta(self, key: Hashable, out: RequestOutput,
                        encode: Callable[[RequestOutput], Any]) -> None:
        """Queue a delta ``out`` of ``key`` (request, choice), or join it to the queued one.

        ``encode`` turns the (merged) delta into the message to send, when the writer takes it.
        """
        entry = self._open.get(key)
        if entry is not None:
            entry.outputs.append(out)
            return
        entry = self._open[key] = _Deltas(out, encode)
        await self.put(entry)

    async def put(self, message: Any) -> None:
        """Queue a message as it is (nothing merges into it)."""
        self._queue.append(message)
        self._ready.set()
        if len(self._queue) > self.limit:
            self._space = anyio.Event()
            await self._space.wait()

    def close(self) -> None:
        """No more messages: :meth:`drain` returns once the queue is written."""
        self._closed = True
        self._ready.set()

    def take(self) -> list[Any]:
        """Everything queued, in order, as messages; what is taken no longer absorbs deltas."""
        batch = [m.message() if isinstance(m, _Deltas) else m for m in self._queue]
        self._queue.clear()
        self._open.clear()
        self._space.set()
        return batch

    async def drain(self, write: Callable[[Any], Awaitable[Any]]) -> None:
        """Write every message, in order, until closed and empty."""
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._ready = anyio.Event()
                await self._ready.wait()
            for message in self.take():
                await write(message)
