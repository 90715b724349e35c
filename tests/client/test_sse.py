"""SSE framing edge cases: multi-line data, comments, CRLF, no trailing blank line."""

from __future__ import annotations

import json

import httpx
import pytest

from servekit.client import APIConnectionError, Client

CHUNK = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "hi", "finish_reason": None, "logprobs": None}]}


def _client(body: bytes) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return Client("http://test", transport=httpx.MockTransport(handler))


def test_a_data_field_split_over_several_lines_is_one_event() -> None:
    text = json.dumps(CHUNK, indent=1)  # a JSON value spread over many lines
    event = "".join(f"data: {line}\r\n" for line in text.splitlines())
    body = (": keep-alive\r\n\r\n" + event + "\r\n" + "data: [DONE]\r\n\r\n").encode()
    with _client(body) as client:
        chunks = list(client.stream_complete("m", "x"))
    assert [c.choices[0].text for c in chunks] == ["hi"]


def test_the_last_event_counts_without_a_trailing_blank_line() -> None:
    body = f"data: {json.dumps(CHUNK)}\n\ndata: {json.dumps(CHUNK)}\n\ndata: [DONE]".encode()
    with _client(body) as client:
        assert len(list(client.stream_complete("m", "x"))) == 2


def test_a_stream_cut_off_before_done_raises_after_its_chunks() -> None:
    body = f"data: {json.dumps(CHUNK)}\n\ndata: {json.dumps(CHUNK)}".encode()
    got = []
    with _client(body) as client, pytest.raises(APIConnectionError, match="DONE"):
        for chunk in client.stream_complete("m", "x"):
            got.append(chunk)
    assert len(got) == 2  # what did arrive is still delivered first


def test_the_connect_timeout_never_exceeds_what_is_left_of_the_total() -> None:
    from servekit.client import Timeout

    seen: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"object": "list", "data": []})

    client = Client("http://test", timeout=Timeout(connect=5.0, read=60.0, total=0.5),
                    transport=httpx.MockTransport(handler))
    with client:
        client.models()
    assert seen[0]["connect"] <= 0.5 and seen[0]["read"] <= 0.5
