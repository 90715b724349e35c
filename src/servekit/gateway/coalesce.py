"""Relay bytes in as few writes as the client's pace allows.

A replica writes one SSE event per token, and the HTTP client hands them over one chunk each;
written to the client one by one, each costs a trip through the ASGI stack and a ``send``
system call, which is most of a gateway's CPU. :func:`coalesced` reads the upstream chunks in
a task of its own and hands the consumer, each time it asks, everything that has arrived since
it last asked, joined: one chunk when the consumer keeps up (nothing is ever held back waiting
for more), several merged when it fell behind. At most ``limit`` bytes wait; past that the
reader stops reading, so a slow client still pushes back on the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["coalesced"]

#: Bytes read ahead of the consumer before the reader waits for it.
READ_AHEAD = 256 * 1024


async def coalesced(chunks: AsyncIterator[bytes], limit: int = READ_AHEAD
                    ) -> AsyncIterator[bytes]:
    """``chunks``, with those that arrived while the consumer was busy joined into one, in
    order; an error reading ``chunks`` is raised after the bytes that came before it. Close
    the generator (``contextlib.aclosing``) to stop the reader before closing the source."""
    pending: list[bytes] = []
    size = 0
    error: BaseException | None = None
    finished = False
    arrived = asyncio.Event()  # pending has bytes, or the source ended
    taken = asyncio.Event()  # the consumer emptied pending

    async def read() -> None:
        nonlocal size, error, finished
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                size += len(chunk)
                arrived.set()
                if size >= limit:
                    taken.clear()
                    await taken.wait()
        except Exception as exc:  # handed to the consumer, after the bytes before it
            error = exc
        finally:
            finished = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not pending and not finished:
                await arrived.wait()
            arrived.clear()
            if pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                size = 0
                taken.set()
                yield data
            elif finished:
                if error is not None:
                    raise error
                return
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
