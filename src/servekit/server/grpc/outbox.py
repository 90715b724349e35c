"""Messages waiting for a call's writer, with deltas merged while a write is in flight.

A grpc.aio ``write`` returns only when the message is on its way, one event-loop round trip
per message. Writing each engine delta in the generating task would tie generation to the
slowest reader and pay that round trip per token. Instead the generating side ``put``s deltas
here without waiting for the wire, and one writer task drains the queue; while a write is in
flight, further deltas of the same choice are merged into the chunk already queued for it (text
appended, token ids and logprobs extended, the finish reason carried). A reader that keeps up
gets one chunk per delta; a slower one gets fewer, larger chunks — an adaptive version of
vLLM's and SGLang's ``stream_interval``. Nothing a chunk counts is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio

__all__ = ["Outbox", "merge_chunk"]


def merge_chunk(target: Any, delta: Any) -> None:
    """Append ``delta`` (a later GenerateChunk of the same choice) to ``target``."""
    target.text += delta.text
    target.token_ids.extend(delta.token_ids)
    if delta.logprobs:
        target.logprobs.extend(delta.logprobs)
    if delta.finish_reason:
        target.finish_reason = delta.finish_reason


class Outbox:
    """A queue of messages for one writer; see the module docstring.

    :meth:`put` waits only while more than ``limit`` messages are queued (and then after the
    message is queued, so a cancelled producer never loses what it counted).
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._queue: deque[Any] = deque()
        self._open: dict[Hashable, Any] = {}  # key -> queued chunk later deltas merge into
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self._closed = False

    async def put_delta(self, key: Hashable, chunk: Any,
                        wrap: Callable[[Any], Any] | None = None) -> None:
        """Queue a delta ``chunk`` of ``key`` (request, choice), or merge it into the queued one.

        ``wrap`` turns the chunk into the message to send (e.g. a SessionResponse holding it).
        """
        target = self._open.get(key)
        if target is not None:
            merge_chunk(target, chunk)
            return
        if wrap is None:
            self._open[key] = chunk
            await self.put(chunk)
        else:
            message = wrap(chunk)
            self._open[key] = message.chunk  # the held sub-message: merging mutates it in place
            await self.put(message)

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
        """Everything queued, in order; what is taken no longer absorbs deltas."""
        batch = list(self._queue)
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
