"""SSE encoding (server side) against decoding (client side, httpx-sse)."""

from __future__ import annotations

import re

import anyio
import httpx
from hypothesis import given
from hypothesis import strategies as st

from servekit.protocol.sse import (
    DONE,
    DONE_DATA,
    MEDIA_TYPE,
    aiter_events,
    encode_event,
    error_event,
    iter_events,
    parse_data,
)


def _response(body: bytes, chunk: int = 7) -> httpx.Response:
    """A streamed response delivering ``body`` in ``chunk``-byte pieces (events split anywhere)."""
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    return httpx.Response(200, headers={"content-type": MEDIA_TYPE},
                          stream=httpx.ByteStream(b"".join(pieces)))


@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"])), max_size=5),
       st.integers(1, 13))
def test_what_encode_event_writes_iter_events_reads_back(datas: list[str], chunk: int) -> None:
    body = b"".join(encode_event(d) for d in datas) + DONE
    got = list(iter_events(_response(body, chunk)))
    # line breaks come back as "\n"; an event without data is not an event
    want = [re.sub(r"\r\n|\r", "\n", d) for d in datas if d]
    assert got == [*want, DONE_DATA]


def test_the_async_twin_reads_the_same_events() -> None:
    body = encode_event('{"a": 1}') + b": comment\r\n" + encode_event("two\nlines") + DONE

    async def main() -> list[str]:
        response = httpx.Response(200, headers={"content-type": MEDIA_TYPE},
                                  stream=httpx.ByteStream(body))
        return [data async for data in aiter_events(response)]

    assert anyio.run(main) == ['{"a": 1}', "two\nlines", DONE_DATA]


def test_an_unterminated_last_event_still_counts() -> None:
    assert list(iter_events(_response(b'data: {"x": 1}\n\ndata: [DONE]'))) == ['{"x": 1}', "[DONE]"]


def test_an_error_event_carries_the_error_body() -> None:
    body = b'{"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}'
    assert parse_data(next(iter_events(_response(error_event(body))))) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}}


def test_parse_data_knows_the_end_marker() -> None:
    assert parse_data(" [DONE] ") == DONE_DATA
    assert parse_data('{"a": [1]}') == {"a": [1]}
