"""Server-sent events the way OpenAI streams them: one ``data: <json>`` event per chunk, an
error as a ``data: {"error": ...}`` event, and ``data: [DONE]`` last.

Encoding is plain bytes (the server side). Decoding (the client side) uses ``httpx-sse``, the
SSE spec's parser: an event's ``data:`` lines are joined with newlines, comments and other
fields are skipped, and CRLF, CR and LF all end a line. Where the spec drops an event that no
blank line ended, :func:`iter_events` keeps it: a stream cut right after its last event (or
ending ``data: [DONE]`` without a blank line) still delivers it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from servekit._optional import require

__all__ = [
    "DONE",
    "DONE_DATA",
    "MEDIA_TYPE",
    "aiter_events",
    "encode_event",
    "error_event",
    "iter_events",
    "parse_data",
]

#: The media type of an event stream.
MEDIA_TYPE = "text/event-stream"
#: The data of the event that ends an OpenAI stream.
DONE_DATA = "[DONE]"
#: The event that ends an OpenAI stream, encoded.
DONE = b"data: [DONE]\n\n"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(data: str) -> bytes:
    """One event carrying ``data``: a ``data:`` field per line, so line breaks survive (as
    ``\\n``: CR and CRLF are line breaks in SSE too)."""
    return "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data)).encode() + b"\n"


def error_event(body: bytes) -> bytes:
    """An error in the middle of a stream, as vLLM and OpenAI send it: a data event whose
    payload is the error body (``{"error": {...}}``)."""
    return b"data: " + body + b"\n\n"


def parse_data(data: str) -> Any:
    """The payload of one event: ``DONE_DATA`` for the end marker, else the decoded JSON."""
    data = data.strip()
    if data == DONE_DATA:
        return DONE_DATA
    return json.loads(data)


class _EndsWithBlankLine:
    """A response whose text gets a trailing blank line, so the last event always ends."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self.headers = response.headers

    def iter_text(self) -> Iterator[str]:
        yield from self._response.iter_text()
        yield "\n\n"

    async def aiter_text(self) -> AsyncIterator[str]:
        async for text in self._response.aiter_text():
            yield text
        yield "\n\n"


def iter_events(response: Any) -> Iterator[str]:
    """The data of each event of an ``httpx.Response`` stream (events without data skipped)."""
    httpx_sse = require("httpx_sse", "client")
    for event in httpx_sse.EventSource(_EndsWithBlankLine(response)).iter_sse():
        if event.data:
            yield event.data


async def aiter_events(response: Any) -> AsyncIterator[str]:
    """The async twin of :func:`iter_events`."""
    httpx_sse = require("httpx_sse", "client")
    async for event in httpx_sse.EventSource(_EndsWithBlankLine(response)).aiter_sse():
        if event.data:
            yield event.data
