"""A :class:`~servekit.limit.store.Store` in Redis, shared by every process that uses it.

One round trip per decision: ``EVALSHA`` of one Lua script (loaded on first ``NOSCRIPT``) that
reads the server's ``TIME`` (no client clock skew), checks and charges all of a key's limits
atomically, and sets the key to expire exactly when all its buckets are full again (so Redis
keeps no state that could change a decision). Keys are ``{prefix}{{key}}``: the hash tag keeps
everything of one key in one cluster slot. Connection failures raise
:class:`~servekit.limit.errors.StoreUnavailableError`; the limiter's fail-open/closed policy
decides and reports it on the decision.

The hot path is lean: per limit set the command is packed once (script hash, per-limit
constants and names as one binary argument), so a decision only packs its key and costs, sends
one buffer on a connection the store holds, and parses the script's integer-array reply itself.
Clients without a plain connection pool (cluster, or anything else) go through
``client.execute_command`` instead.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio

from servekit._optional import require
from servekit.errors import ServekitError
from servekit.limit import _lua
from servekit.limit.bucket import LimitSet
from servekit.limit.errors import LimitConfigError, StoreUnavailableError
from servekit.limit.store import TakeResult

_MODES: Final = (b"$1\r\n0\r\n", b"$1\r\n1\r\n", b"$1\r\n2\r\n")
_CRLF: Final = b"\r\n"


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Plan:
    """The constant parts of the ``EVALSHA`` for one :class:`LimitSet`, packed once."""

    __slots__ = ("args", "costs", "costs_head", "head", "limits", "tail")

    def __init__(self, limits: LimitSet, sha: str) -> None:
        self.limits = limits  # held, so the id() this plan is cached under stays unique
        n = len(limits)
        spec = b"".join(
            struct.pack("<dd", 1e6 / rate, tau * 1e6)
            for rate, tau in zip(limits.rates, limits.taus, strict=True)
        )
        names = [name.encode() for name in limits.names]
        #: RESP: EVALSHA sha 1 key mode costs spec names...
        self.head = b"*%d\r\n$7\r\nEVALSHA\r\n%s$1\r\n1\r\n" % (7 + n, _bulk(sha.encode()))
        self.costs = struct.Struct(f"<{n}d")
        self.costs_head = b"$%d\r\n" % (8 * n)
        self.tail = b"".join([_CRLF, _bulk(spec), *map(_bulk, names)])
        #: the same arguments for ``execute_command`` (after key, mode and costs)
        self.args: tuple[bytes, ...] = (spec, *names)

    def pack(self, rkey: bytes, mode: int, amounts: Sequence[float]) -> bytes:
        return b"".join((
            self.head, b"$%d\r\n" % len(rkey), rkey, _CRLF, _MODES[mode],
            self.costs_head, self.costs.pack(*amounts), self.tail,
        ))


class _ReplyError(ServekitError):
    """An error reply (``-ERR ...``) read on the fast path."""


def _read_reply(sock: Any) -> Any:
    """Read one RESP reply from ``sock``: the script's integer array, fast; anything else too."""
    buf = sock.recv(65536)
    while True:
        if not buf:
            raise ConnectionError("connection closed by server")
        if buf[0] == 42 and buf[-2:] == _CRLF:  # "*n" of ":int": the script's reply
            parts = buf[:-2].split(b"\r\n:")
            if len(parts) > 1 and int(parts[0][1:]) == len(parts) - 1:
                return list(map(int, parts[1:]))
        parsed = _parse(buf, 0)
        if parsed is not None:
            return parsed[0]
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("connection closed by server")
        buf += more


def _parse(buf: bytes, pos: int) -> tuple[Any, int] | None:
    """Parse the RESP value at ``buf[pos:]``: ``(value, end)``, or None if incomplete."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        return None
    kind, line, nxt = buf[pos], buf[pos + 1 : end], end + 2
    if kind == 58:  # ':'
        return int(line), nxt
    if kind in (43, 45):  # '+', '-'
        return (line if kind == 43 else _ReplyError(line.decode(errors="replace"))), nxt
    if kind == 36:  # '$'
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buf) < nxt + size + 2:
            return None
        return buf[nxt : nxt + size], nxt + size + 2
    if kind == 42:  # '*'
        items = []
        for _ in range(max(int(line), 0)):
            item = _parse(buf, nxt)
            if item is None:
                return None
            items.append(item[0])
            nxt = item[1]
        return items, nxt
    raise ConnectionError(f"unexpected reply from redis: {buf[pos:pos + 40]!r}")


class _RoundTrip:
    """One take in a worker thread, which its caller may stop waiting for: whichever of
    :meth:`finish` (the thread, with the reply) and :meth:`abandon` (the caller, cancelled)
    comes second learns that a charge nobody will settle must be refunded."""

    __slots__ = ("abandoned", "charged", "finished", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = self.finished = self.charged = False

    def finish(self, result: TakeResult) -> bool:
        with self.lock:
            self.finished, self.charged = True, result[0]
            return self.abandoned and self.charged

    def abandon(self) -> bool:
        with self.lock:
            self.abandoned = True
            return self.finished and self.charged


class RedisStore:
    """Bucket state in Redis (``pip install 'servekit[redis]'``).

    Pass ``url`` (``redis://host:port/db``) or a ready ``redis.Redis`` ``client``. ``timeout`` is
    the socket and connect timeout in seconds: how long a decision may wait on a sick server
    before the fail-open/closed policy answers. The store checks connections out of the
    client's pool and keeps them (one per concurrent caller, so threads never share one).
    ``atake`` and friends run the sync call in a worker thread, so the store works under
    asyncio and trio alike. A task cancelled while its take is in flight gets no decision and
    is charged nothing: anyio's cancellation waits for the reply, asyncio's own
    (``task.cancel()``) refunds whatever the command charged.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = "servekit:rl:",
        timeout: float = 0.25,
    ) -> None:
        redis = require("redis", "redis")
        if client is None:
            if url is None:
                raise LimitConfigError("RedisStore needs a url or a client, got neither")
            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        self.client = client
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._noscript: type[BaseException] = redis.exceptions.NoScriptError
        self._response_error: type[Exception] = redis.exceptions.ResponseError
        self._sha = _lua.SHA1
        self._plans: dict[int, _Plan] = {}
        pool = getattr(client, "connection_pool", None)
        self._pool: Any = pool if isinstance(client, redis.Redis) and pool is not None else None
        self._free: list[Any] = []  # our idle connections (list.pop/append: thread-safe)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """A store on the server ``url`` names (``redis://host:port/db``, ``rediss://...``,
        ``unix://...``); redis-py reads the URL's query parameters."""
        return cls(url)

    def redis_key(self, key: str) -> str:
        """The Redis key holding ``key``'s buckets: ``{prefix}{{key}}``."""
        return f"{self.prefix}{{{key}}}"

    def _plan(self, limits: LimitSet) -> _Plan:
        plan = self._plans.get(id(limits))
        if plan is None or plan.limits is not limits:
            plan = self._plans[id(limits)] = _Plan(limits, self._sha)
        return plan

    def _call(self, mode: int, key: str, limits: LimitSet, amounts: Sequence[float]) -> TakeResult:
        plan = self._plans.get(id(limits))
        if plan is None or plan.limits is not limits:
            plan = self._plan(limits)
        rkey = f"{self.prefix}{{{key}}}".encode()
        try:
            if self._pool is not None:
                reply = self._fast(plan.pack(rkey, mode, amounts))
            else:
                reply = self._slow(rkey, mode, plan, amounts)
        except self._errors as exc:
            raise StoreUnavailableError(f"redis: {exc}") from exc
        now_us = reply[1]
        now = now_us * 1e-6
        return reply[0] == 1, now, tuple([(now_us + d) * 1e-6 for d in reply[2:]])

    def _fast(self, packed: bytes) -> list[int]:
        """Send ``packed`` on one of our connections and read the integer-array reply."""
        free = self._free
        conn = free.pop() if free else self._pool.get_connection()
        try:
            sock = conn._sock
            sock.sendall(packed)
            reply = _read_reply(sock)
            if isinstance(reply, _ReplyError) and str(reply).startswith("NOSCRIPT"):
                sock.sendall(_pack("SCRIPT", "LOAD", _lua.SCRIPT))
                loaded = _read_reply(sock)
                if isinstance(loaded, _ReplyError):
                    reply = loaded
                else:
                    sock.sendall(packed)
                    reply = _read_reply(sock)
        except BaseException:
            conn.disconnect()  # a half-read reply must never meet the next command
            self._pool.release(conn)
            raise
        free.append(conn)
        if isinstance(reply, _ReplyError):
            raise self._response_error(str(reply))
        result: list[int] = reply
        return result

    def _slow(self, rkey: bytes, mode: int, plan: _Plan, amounts: Sequence[float]) -> list[int]:
        """The same command through ``client.execute_command`` (clients without a plain pool)."""
        args = (rkey, str(mode), plan.costs.pack(*amounts), *plan.args)
        try:
            reply = self.client.execute_command("EVALSHA", self._sha, 1, *args)
        except self._noscript:
            self._sha = self.client.script_load(_lua.SCRIPT)
            reply = self.client.execute_command("EVALSHA", self._sha, 1, *args)
        return [int(x) for x in reply]

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """Charge ``costs`` to every limit of ``key`` if all admit them (``now`` is ignored)."""
        return self._call(_lua.TAKE, key, limits, costs)

    def peek(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """The verdict ``take`` would give, charging nothing."""
        return self._call(_lua.PEEK, key, limits, costs)

    def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float], now: float) -> TakeResult:
        """Add ``deltas`` (negative: refund) to ``key``'s limits without a check."""
        return self._call(_lua.ADJUST, key, limits, deltas)

    async def atake(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``take`` (the sync call in a worker thread, shielded from cancellation)."""
        trip = _RoundTrip()
        try:
            return await self._in_thread(self._trip, trip, key, limits, costs)
        except anyio.get_cancelled_exc_class():
            # asyncio's own task.cancel() (grpc.aio's for a cancelled RPC, asyncio.timeout's)
            # is not anyio's cancellation and goes through the shield, while the command runs
            # on in its thread: whichever of the two ends second takes back what it charged
            if trip.abandon():
                threading.Thread(target=self._untake, args=(key, limits, costs),
                                 daemon=True).start()
            raise

    async def apeek(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``peek``."""
        return await self._in_thread(self._call, _lua.PEEK, key, limits, costs)

    async def aadjust(
        self, key: str, limits: LimitSet, deltas: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``adjust``."""
        return await self._in_thread(self._call, _lua.ADJUST, key, limits, deltas)

    async def _in_thread(self, call: Callable[..., TakeResult], *args: Any) -> TakeResult:
        # shielded: a cancelled caller still gets the result of a command Redis has run, so a
        # charge is never made and lost (the Store contract)
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(call, *args)
        return result

    def _trip(self, trip: _RoundTrip, key: str, limits: LimitSet,
              costs: Sequence[float]) -> TakeResult:
        result = self._call(_lua.TAKE, key, limits, costs)
        if trip.finish(result):
            self._untake(key, limits, costs)
        return result

    def _untake(self, key: str, limits: LimitSet, amounts: Sequence[float]) -> None:
        """Refund a take nobody received (best-effort: with Redis down, the charge stands)."""
        with contextlib.suppress(StoreUnavailableError):
            self._call(_lua.ADJUST, key, limits, [-a for a in amounts])

    def close(self) -> None:
        """Give our connections back to the pool and close the client's connections."""
        while self._free:
            conn = self._free.pop()
            conn.disconnect()
            self._pool.release(conn)
        self.client.close()


def _pack(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    parts.extend(_bulk(a.encode()) for a in args)
    return b"".join(parts)
