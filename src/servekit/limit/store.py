"""Where bucket state lives: the :class:`Store` protocol and the default :class:`MemoryStore`.

A store keeps, per key, one ``full_at`` time per limit (see :mod:`servekit.limit.bucket`) and
answers three atomic operations over all of a key's limits at once:

- ``take``: admit ``costs`` if every limit can take its cost, and charge them all; else nothing;
- ``peek``: the same verdict, charging nothing;
- ``adjust``: add ``deltas`` (negative: refund) without a check; used to settle reservations.

Each returns ``(conforming, now, full_at)`` with ``full_at`` after the operation; ``now`` is the
store's time (the caller's clock for memory, the server's ``TIME`` for Redis). Stores that talk
over a network raise :class:`~servekit.limit.errors.StoreUnavailableError` when unreachable.

A store is a ``limiter_store`` plugin (interface version 1, see :mod:`servekit.plugins`);
:func:`store_from_url` opens one from a URL whose scheme names the plugin (``memory://``,
``redis://host:port/db``, or a plugin's own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from servekit import plugins
from servekit._validators import int_at_least, prefixed
from servekit.limit.bucket import LimitSet
from servekit.limit.errors import LimitConfigError, StoreFullError

#: ``(conforming, now, full_at per limit)``
TakeResult = tuple[bool, float, tuple[float, ...]]

_AT_LEAST_ONE = int_at_least(1, error=prefixed(LimitConfigError))


@runtime_checkable
class Store(Protocol):
    """Atomic multi-limit bucket operations for a key (sync and async twins); version 1.

    Contract: each operation is atomic over all of a key's limits (concurrent callers, other
    processes sharing the store, never see half of it); ``take`` never admits more than
    ``capacity + rate * T`` per limit over any span ``T``; ``adjust`` is never refused; an
    async twin cancelled while it runs either completes and returns its result or has had no
    effect (a store doing I/O shields its own round trip, as :class:`RedisStore` does; an
    in-process store simply never awaits), so the limiter never loses a charge; an unreachable backend raises
    :class:`~servekit.limit.errors.StoreUnavailableError` and never blocks longer than the
    store's own timeout. A plugin class also provides ``from_url(url)`` (a classmethod) so
    :func:`store_from_url` can open it.
    """

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """Charge ``costs`` to every limit of ``key`` if all admit them, else nothing."""
        ...

    def peek(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """The verdict ``take`` would give, charging nothing."""
        ...

    def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float], now: float) -> TakeResult:
        """Add ``deltas`` (negative: refund) to ``key``'s limits without a check."""
        ...

    async def atake(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``take``."""
        ...

    async def apeek(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``peek``."""
        ...

    async def aadjust(
        self, key: str, limits: LimitSet, deltas: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``adjust``."""
        ...


class _Buckets:
    """Bounded map of key -> ``full_at`` list that only ever evicts keys whose buckets are full.

    ``data`` is a plain dict in insertion order. When it is at ``maxsize`` and a new key
    arrives, the oldest keys are examined in turn (a CLOCK-style sweep: FIFO order, so a hit
    costs no reordering); the first full one is dropped (no state lost: absent means full), and
    busy keys met on the way are moved to the recent end (a second chance). If every key holds
    state, :class:`StoreFullError` is raised, and raised again without another scan until the
    earliest time one of them can be full.
    """

    __slots__ = ("data", "maxsize", "no_room_until")

    def __init__(self, maxsize: int) -> None:
        self.data: dict[str, list[float]] = {}
        self.maxsize = maxsize
        self.no_room_until = -1.0

    def insert(self, key: str, state: list[float], now: float) -> None:
        """Add ``key`` (absent) with ``state``, evicting a full key first when at the bound."""
        data = self.data
        if len(data) >= self.maxsize:
            self._evict(now)
        data[key] = state

    def _evict(self, now: float) -> None:
        if now < self.no_room_until:
            raise self._full_error()
        data = self.data
        busy: list[str] = []
        soonest = float("inf")
        victim = None
        for key, state in data.items():
            full_at = max(state)
            if full_at <= now:
                victim = key
                break
            busy.append(key)
            soonest = min(soonest, full_at)
        for key in busy:  # a second chance: to the recent end
            data[key] = data.pop(key)
        if victim is not None:
            del data[victim]
            return
        self.no_room_until = soonest
        raise self._full_error()

    def _full_error(self) -> StoreFullError:
        return StoreFullError(
            f"memory store is full: all {self.maxsize} keys hold state until "
            f"t={self.no_room_until:.3f}; raise max_keys"
        )


class MemoryStore:
    """In-process store: per-key state in a bounded map (default) for one process.

    ``max_keys`` bounds the number of keys held at once; a key is dropped only when all its
    buckets are full, so the bound never changes a decision (see :class:`StoreFullError`).
    The store is not thread-safe: use one per thread or event loop, as with the limiter.
    """

    __slots__ = ("_buckets", "_get")

    def __init__(self, max_keys: int = 1_000_000) -> None:
        _AT_LEAST_ONE.check("max_keys", max_keys)
        self._buckets = _Buckets(max_keys)
        self._get: Callable[[str], list[float] | None] = self._buckets.data.get

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """A store from ``memory://`` (optionally ``memory://?max_keys=N``)."""
        query = parse_qs(urlsplit(url).query, strict_parsing=False)
        unknown = sorted(set(query) - {"max_keys"})
        if unknown:
            raise LimitConfigError(f"memory store URL {url!r}: unknown parameter(s) {unknown}")
        if "max_keys" not in query:
            return cls()
        raw = query["max_keys"][-1]
        try:
            max_keys = int(raw)
        except ValueError:
            raise LimitConfigError(
                f"memory store URL {url!r}: max_keys must be an integer, got {raw!r}") from None
        return cls(max_keys)

    def __len__(self) -> int:
        return len(self._buckets.data)

    def take(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """Charge ``costs`` to every limit of ``key`` if all admit them, else nothing."""
        state = self._get(key)
        if state is not None and len(state) == 1:  # the common case, without loop overhead
            base = state[0]
            full_at = (base if base > now else now) + costs[0] * limits.inv_rates[0]
            if full_at - now > limits.taus[0]:
                return False, now, (base,)
            state[0] = full_at
            return True, now, (full_at,)
        inv, taus = limits.inv_rates, limits.taus
        if state is None:
            new = [now + c * r for c, r in zip(costs, inv, strict=False)]
            for i in range(len(new)):
                if new[i] - now > taus[i]:
                    return False, now, (now,) * len(new)
            self._buckets.insert(key, new, now)
            return True, now, tuple(new)
        new = []
        for i in range(len(state)):
            base = state[i]
            full_at = (base if base > now else now) + costs[i] * inv[i]
            if full_at - now > taus[i]:
                return False, now, tuple(state)
            new.append(full_at)
        state[:] = new
        return True, now, tuple(new)

    def peek(self, key: str, limits: LimitSet, costs: Sequence[float], now: float) -> TakeResult:
        """The verdict ``take`` would give, charging nothing."""
        state = self._get(key)
        full_at = tuple(state) if state is not None else (now,) * len(limits)
        inv, taus = limits.inv_rates, limits.taus
        for i, base in enumerate(full_at):
            if (base if base > now else now) + costs[i] * inv[i] - now > taus[i]:
                return False, now, full_at
        return True, now, full_at

    def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float], now: float) -> TakeResult:
        """Add ``deltas`` (negative: refund) to ``key``'s limits without a check."""
        state = self._get(key)
        old = state if state is not None else [now] * len(limits)
        new = [
            (base if base > now else now) + d * r
            for base, d, r in zip(old, deltas, limits.inv_rates, strict=False)
        ]
        if state is not None:
            state[:] = new
        elif max(new) > now:  # a charge on an absent (full) key: it now holds state
            self._buckets.insert(key, new, now)
        return True, now, tuple(new)

    async def atake(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``take`` (no checkpoint: atomic with respect to cancellation)."""
        return self.take(key, limits, costs, now)

    async def apeek(
        self, key: str, limits: LimitSet, costs: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``peek``."""
        return self.peek(key, limits, costs, now)

    async def aadjust(
        self, key: str, limits: LimitSet, deltas: Sequence[float], now: float
    ) -> TakeResult:
        """Async ``adjust``."""
        return self.adjust(key, limits, deltas, now)


def store_from_url(url: str) -> Store:
    """Open the store a URL names: its scheme is the ``limiter_store`` plugin's name
    (``memory://``, ``redis://host:port/db``, ``rediss://...``, or a plugin's own), and the
    plugin's ``from_url(url)`` builds it."""
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if not scheme:
        raise plugins.PluginArgumentError(
            f"limiter store URL {url!r} has no scheme; use memory://, redis://host:port/db "
            "or a limiter_store plugin's scheme"
        )
    factory = plugins.load("limiter_store", scheme)
    from_url = getattr(factory, "from_url", None)
    if not callable(from_url):
        raise plugins.PluginTypeError(
            f"limiter_store plugin {scheme!r} has no from_url(url), so it cannot open {url!r}"
        )
    try:
        store = from_url(url)
    except (TypeError, ValueError) as exc:
        raise plugins.PluginArgumentError(
            f"limiter_store plugin {scheme!r} rejected the URL {url!r}: {exc}"
        ) from exc
    if not isinstance(store, Store):
        raise plugins.PluginTypeError(
            f"limiter_store plugin {scheme!r} built {type(store).__name__}, which is not a Store"
        )
    return store
