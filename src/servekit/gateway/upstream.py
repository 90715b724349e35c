"""The relay's HTTP/1.1 client: keep-alive connections to the replicas, bodies read in bulk.

A replica streams one SSE event per token, each its own HTTP chunk. A general client (httpx
over h11) hands those over one chunk at a time, through several layers per chunk, which cost
the gateway more CPU than everything else it does for a stream. :class:`Upstream` reads
whatever the socket holds (up to 64 KiB), decodes the chunked framing in one pass and hands
over the data of all the chunks that arrived, so a relay that falls behind catches up in one
write, and one that keeps up is never held back: nothing waits for more bytes than are there.

Errors are httpx's (:class:`httpx.ConnectError`, :class:`httpx.ReadError`,
:class:`httpx.WriteError`, :class:`httpx.RemoteProtocolError`, all
:class:`httpx.TransportError`), so callers handle one family. A connection goes back to the
pool only after its response was read to the end; closing a response early closes its
connection, which is how a replica learns that the client went away. A request on a reused
connection that the replica had closed meanwhile is sent once more on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httpx

from servekit.errors import ServekitError

__all__ = ["Upstream", "UpstreamResponse"]

_READ = 64 * 1024
_HEAD_LIMIT = 1 << 20
_NO_BODY = frozenset({204, 304})
_SET_HERE = frozenset({"host", "content-length", "accept-encoding", "transfer-encoding",
                       "connection"})


class _Conn:
    __slots__ = ("key", "reader", "writer")

    def __init__(self, key: tuple[str, str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.key, self.reader, self.writer = key, reader, writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Upstream:
    """Pooled keep-alive HTTP/1.1 connections to the replicas."""

    def __init__(self, connect_timeout: float = 2.0, write_timeout: float = 30.0,
                 max_idle: int = 512) -> None:
        self.connect_timeout, self.write_timeout = connect_timeout, write_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def send(self, method: str, url: str, headers: Mapping[str, str],
                   body: bytes = b"") -> UpstreamResponse:
        """Send one request; the response once its head has arrived (the body is read from
        :meth:`UpstreamResponse.aiter_raw` or :meth:`UpstreamResponse.aread`)."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()
                  if k.lower() not in _SET_HERE]
        # bodies are relayed as they come: never compressed
        lines.append(f"accept-encoding: identity\r\ncontent-length: {len(body)}\r\n\r\n")
        request = "".join(lines).encode("latin-1") + body
        while True:
            conn, reused = self._take(key), True
            if conn is None:
                conn, reused = await self._connect(key), False
            try:
                conn.writer.write(request)
                await asyncio.wait_for(conn.writer.drain(), self.write_timeout)
                return await UpstreamResponse._read_head(self, conn, method)
            except (OSError, asyncio.TimeoutError, httpx.TransportError) as exc:
                conn.close()
                if reused and isinstance(exc, (_NoResponseError, ConnectionError)):
                    continue  # the replica had closed this idle connection: a new one
                if isinstance(exc, httpx.TransportError):
                    raise
                raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc
            except BaseException:  # cancelled mid-request: the replica sees the close
                conn.close()
                raise

    async def aclose(self) -> None:
        """Close the idle connections."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take(self, key: tuple[str, str, int]) -> _Conn | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _put(self, conn: _Conn) -> None:
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) < self.max_idle and conn.usable():
            conns.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, str, int]) -> _Conn:
        scheme, host, port = key
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, limit=_HEAD_LIMIT),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _Conn(key, reader, writer)


class _NoResponseError(httpx.RemoteProtocolError, ServekitError):
    """The connection ended before any byte of a response (an httpx transport error, so the
    relay's retry and failover paths treat it like httpx's own)."""


class UpstreamResponse:
    """One response: status and headers, then its body."""

    def __init__(self, pool: Upstream, conn: _Conn, status_code: int,
                 headers: httpx.Headers, method: str) -> None:
        self.status_code, self.headers = status_code, headers
        self._pool, self._conn = pool, conn
        self._released = False
        self._chunked = False
        self._left: int | None = None  # content-length still to read (None: until EOF)
        self._keep = headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status_code in _NO_BODY or 100 <= status_code < 200:
            self._left = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise httpx.RemoteProtocolError("bad content-length") from None
        else:
            self._keep = False
        self._done = self._left == 0 and not self._chunked

    @classmethod
    async def _read_head(cls, pool: Upstream, conn: _Conn, method: str) -> UpstreamResponse:
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _NoResponseError("the connection closed before a response") from exc
            raise httpx.RemoteProtocolError("the connection closed mid-head") from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("response head too long") from exc
        except OSError as exc:  # reset before any byte came back
            raise _NoResponseError(f"{type(exc).__name__}: {exc}") from exc
        status_line, *rest = head[:-4].decode("latin-1").split("\r\n")
        try:
            version, code = status_line.split(" ", 2)[:2]
            status = int(code)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad status line {status_line!r}") from None
        pairs = []
        for line in rest:
            name, sep, value = line.partition(":")
            if sep:
                pairs.append((name.strip().lower(), value.strip()))
        response = cls(pool, conn, status, httpx.Headers(pairs), method)
        if version == "HTTP/1.0":
            response._keep = False
        if 100 <= status < 200:  # an interim response: the real one follows
            return await cls._read_head(pool, conn, method)
        if response._done:
            response._release()
        return response

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body, decoded from its framing, one piece per read of what the socket holds."""
        if self._done:
            return
        reader = self._conn.reader
        buf = bytearray()
        left = 0  # bytes of the current chunk still to come
        crlf = False  # the CRLF after a chunk's data is due
        trailer = False  # past the last chunk: skipping trailer lines
        while True:
            want = _READ if self._left is None else min(_READ, self._left)
            try:
                data = await reader.read(want)
            except OSError as exc:
                self._close()
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
            if not data:
                if self._left is None and not self._chunked:  # until EOF: this is the end
                    self._done = True
                    self._close()
                    return
                self._close()
                raise httpx.RemoteProtocolError("the replica closed the connection mid-body")
            if not self._chunked:
                if self._left is not None:
                    self._left -= len(data)
                    if self._left == 0:
                        self._done = True
                        self._release()
                yield data
                if self._done:
                    return
                continue
            buf += data
            out: list[bytes] = []
            pos, end = 0, len(buf)
            while pos < end:
                if left:
                    take = min(left, end - pos)
                    out.append(bytes(buf[pos:pos + take]))
                    pos += take
                    left -= take
                    crlf = left == 0
                    continue
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                line = bytes(buf[pos:nl])
                pos = nl + 2
                if crlf:
                    crlf = False
                    if line:
                        self._close()
                        raise httpx.RemoteProtocolError("bad chunk framing")
                    continue
                if trailer:
                    if not line:  # the empty line ending the trailers: done
                        self._done = True
                        break
                    continue
                try:
                    left = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._close()
                    raise httpx.RemoteProtocolError("bad chunk size") from None
                trailer = left == 0
            del buf[:pos]
            if self._done:
                if buf:  # bytes past the end of the response: do not reuse
                    self._keep = False
                self._release()
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            if self._done:
                return

    async def aread(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.aiter_raw()])

    async def aclose(self) -> None:
        """Done with the response: a connection not read to the end is closed."""
        if not self._done:
            self._close()

    def _release(self) -> None:
        self._released = True
        if self._keep:
            self._pool._put(self._conn)
        else:
            self._conn.close()

    def _close(self) -> None:
        self._done = True
        self._keep = False
        if not self._released:
            self._released = True
            self._conn.close()
