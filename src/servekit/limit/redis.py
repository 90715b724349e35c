"""A :class:`~servekit.limit.store.Store` in Redis, shared by every process that uses it.

One round trip per decision: ``EVALSHA`` of one Lua script (loaded on first ``NOSCRIPT``) that
reads the server's ``TIME`` (no client clock skew), checks and charges all of a key's limits
atomically, and sets the key to expire exactly when all its buckets are full again (so Redis
keeps no state that could change a decision). Keys are ``{prefix}{{key}}``: the hash tag keeps
everything of one key in one cluster slot. Connection failures raise
:class:`~servekit.limit.errors.StoreUnavailableError`; the limiter's fail-open/closed policy
decides and reports it on the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from servekit._optional import require
from servekit.limit import _lua
from servekit.limit.bucket import LimitSet
from servekit.limit.errors import StoreUnavailableError
from servekit.limit.store import TakeResult


class RedisStore:
    """Bucket state in Redis (``pip install 'servekit[redis]'``).

    Pass ``url`` (``redis://host:port/db``) or a ready ``redis.Redis`` ``client``. ``timeout`` is
    the socket and connect timeout in seconds: how long a decision may wait on a sick server
    before the fail-open/closed policy answers. ``atake`` and friends run the sync client in a
    worker thread, so the store works under asyncio and trio alike.
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
                raise ValueError("RedisStore needs a url or a client")
            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        self.client = client
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        )
        self._noscript: type[BaseException] = redis.exceptions.NoScriptError
        self._sha = _lua.SHA1
        self._args: dict[int, tuple[str | float, ...]] = {}

    def redis_key(self, key: str) -> str:
        """The Redis key holding ``key``'s buckets: ``{prefix}{{key}}``."""
        return f"{self.prefix}{{{key}}}"

    def _limit_args(self, limits: LimitSet) -> tuple[str | float, ...]:
        args = self._args.get(id(limits))
        if args is None:
            args = (len(limits), *limits.names, *limits.rates, *limits.taus)
            self._args[id(limits)] = args
        return args

    def _call(self, mode: int, key: str, limits: LimitSet, amounts: Sequence[float]) -> TakeResult:
        args = (mode, *self._limit_args(limits), *amounts)
        rkey = self.redis_key(key)
        try:
            try:
                reply = self.client.evalsha(self._sha, 1, rkey, *args)
            except self._noscript:
                self._sha = self.client.script_load(_lua.SCRIPT)
                reply = self.client.evalsha(self._sha, 1, rkey, *args)
        except self._errors as exc:
            raise StoreUnavailableError(f"redis: {exc}") from exc
        return reply[0] == 1, float(reply[1]), tuple(map(float, reply[2:]))

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
        """Async ``take`` (the sync client in a worker thread)."""
        return await anyio.to_thread.run_sync(self._call, _lua.TAKE, key, limits, costs)

    async def apeek(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``peek``."""
        return await anyio.to_thread.run_sync(self._call, _lua.PEEK, key, limits, costs)

    async def aadjust(
        self, key: str, limits: LimitSet, deltas: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``adjust``."""
        return await anyio.to_thread.run_sync(self._call, _lua.ADJUST, key, limits, deltas)

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()
