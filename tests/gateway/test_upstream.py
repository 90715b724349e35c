"""The relay's HTTP/1.1 client against a real socket server: any framing split decodes to the
body, connections are reused after a whole response and dropped otherwise, a replica that
closed an idle connection costs nothing, and errors are httpx's transport errors."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.gateway.upstream import Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class Server:
    """A socket server answering each request with ``handler``; counts connections and
    requests, and records whether each connection saw EOF from the client."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = asyncio.Event()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.client_closed.set()
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.handler(reader, writer, body)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.client_closed.set()
        finally:
            writer.close()


def _chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=12),
       st.lists(st.integers(1, 4000), max_size=10))
def test_any_split_of_a_chunked_body_decodes_to_the_body_and_keeps_the_connection(
        pieces: list[bytes], cuts: list[int]) -> None:
    wire = _HEAD + _chunked(pieces)
    points = sorted({c % len(wire) for c in cuts} | {0, len(wire)})

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     body: bytes) -> None:
        for a, b in itertools.pairwise(points):
            writer.write(wire[a:b])
            await writer.drain()
            await asyncio.sleep(0.001)  # separate reads on the client

    async def run() -> None:
        server = Server(answer)
        async with server as url:
            pool = Upstream()
            for _ in range(2):
                response = await pool.send("POST", url + "/v1/x", {"a": "b"}, b"{}")
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert await response.aread() == b"".join(pieces)
            assert server.connections == 1  # kept alive and reused
            await pool.aclose()

    asyncio.run(run())


def test_content_length_close_delimited_and_empty_bodies() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     body: bytes) -> None:
        if body == b"length":
            writer.write(b"HTTP/1.1 429 Too Many\r\nretry-after: 3\r\ncontent-length: 5\r\n\r\n"
                         b"hello")
        elif body == b"empty":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:  # no length: the body runs to EOF and the connection cannot be reused
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
            await writer.drain()
            writer.close()
        await writer.drain()

    async def run() -> None:
        server = Server(answer)
        async with server as url:
            pool = Upstream()
            r = await pool.send("POST", url, {}, b"length")
            assert (r.status_code, r.headers["retry-after"], await r.aread()) == (429, "3",
                                                                                 b"hello")
            r = await pool.send("POST", url, {}, b"empty")
            assert (r.status_code, await r.aread()) == (204, b"")
            r = await pool.send("POST", url, {}, b"eof")
            assert await r.aread() == b"until close"
            r = await pool.send("POST", url, {}, b"length")
            assert await r.aread() == b"hello"
            assert server.connections == 2  # one kept alive, then a new one after the EOF
            await pool.aclose()

    asyncio.run(run())


def test_an_idle_connection_the_replica_closed_is_replaced_without_an_error() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     body: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # as a keep-alive timeout would, without "connection: close"

    async def run() -> None:
        server = Server(answer)
        async with server as url:
            pool = Upstream()
            for _ in range(3):
                r = await pool.send("POST", url, {}, b"")
                assert await r.aread() == b"ok"
            assert server.connections == 3 and len(server.requests) == 3
            await pool.aclose()

    asyncio.run(run())


def test_closing_a_response_early_closes_its_connection() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     body: bytes) -> None:
        writer.write(_HEAD + b"5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the replica learns the client went away
        server.client_closed.set()

    server = Server(answer)

    async def run() -> None:
        async with server as url:
            pool = Upstream()
            r = await pool.send("POST", url, {}, b"")
            assert await anext(r.aiter_raw()) == b"first"
            await r.aclose()
            await asyncio.wait_for(server.client_closed.wait(), 5)
            await pool.aclose()

    asyncio.run(run())


def test_errors_are_httpx_transport_errors() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  body: bytes) -> None:
        writer.write(_HEAD + b"5\r\nfirst\r\n")  # and then the replica dies
        await writer.drain()
        writer.close()

    async def run() -> None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(httpx.ConnectError):
            await Upstream().send("GET", f"http://127.0.0.1:{port}/", {})
        async with Server(cut) as url:
            r = await Upstream().send("POST", url, {}, b"")
            got = []
            with pytest.raises(httpx.RemoteProtocolError):
                async for piece in r.aiter_raw():
                    got.append(piece)
            assert got == [b"first"]

    asyncio.run(run())
