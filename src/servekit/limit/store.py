"""Where bucket state lives: the :class:`Store` protocol and the default :class:`MemoryStore`.

A store keeps, per key, one ``full_at`` time per limit (see :mod:`servekit.limit.bucket`) and
answers three atomic operations over all of a key's limits at once:

- ``take``: admit ``costs`` if every limit can take its cost, and charge them all; else nothing;
- ``peek``: the same verdict, charging nothing;
- ``adjust``: add ``deltas`` (negative: refund) without a check; used to settle reservations.

Each returns ``(conforming, now, full_at)`` with ``full_at`` after the operation; ``now`` is the
store's time (the caller's clock for memory, the server's ``TIME`` for Redis). Stores that talk
over a network raise :class:`~servekit.limit.errors.StoreUnavailableError` when unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from cachetools import FIFOCache

from servekit.limit.bucket import LimitSet
from servekit.limit.errors import LimitConfigError, StoreFullError

#: ``(conforming, now, full_at per limit)``
TakeResult = tuple[bool, float, tuple[float, ...]]


@runtime_checkable
class Store(Protocol):
    """Atomic multi-limit bucket operations for a key (sync and async twins)."""

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


class _Buckets(FIFOCache[str, list[float]]):
    """Bounded map of key -> ``full_at`` list that only ever evicts keys whose buckets are full.

    When the map is at ``maxsize`` and a new key arrives, the oldest keys are examined in turn
    (a CLOCK-style sweep: FIFO order, so a hit costs no reordering); the first full one is
    dropped (no state lost: absent means full), and busy keys met on the way are moved to the
    recent end (a second chance). If every key holds state,
    :class:`StoreFullError` is raised, and raised again without another scan until the earliest
    time one of them can be full.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.now = 0.0
        self.no_room_until = -1.0

    def popitem(self) -> tuple[str, list[float]]:
        if self.now < self.no_room_until:
            raise self._full_error()
        busy: list[tuple[str, list[float]]] = []
        soonest = float("inf")
        try:
            for _ in range(len(self)):
                key, state = super().popitem()
                full_at = max(state)
                if full_at <= self.now:
                    return key, state
                busy.append((key, state))
                soonest = min(soonest, full_at)
        finally:
            for key, state in busy:  # popped len(busy) + (0 or 1): re-inserting never evicts
                FIFOCache.__setitem__(self, key, state)
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
        if isinstance(max_keys, bool) or not (isinstance(max_keys, int) and max_keys > 0):
            raise LimitConfigError(f"max_keys must be a positive int, got {max_keys!r}")
        self._buckets = _Buckets(max_keys)
        # A FIFO cache needs no bookkeeping on a hit, so reads may go straight to the dict
        # cachetools keeps its items in (one Python call less per decision); writes, and
        # so eviction, always go through the cache.
        data = getattr(self._buckets, "_Cache__data", None)
        self._get: Callable[[str], list[float] | None] = (
            data.get if isinstance(data, dict) else self._buckets.get
        )

    def __len__(self) -> int:
        return len(self._buckets)

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
            buckets = self._buckets
            buckets.now = now
            buckets[key] = new
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
        buckets = self._buckets
        state = self._get(key)
        old = state if state is not None else [now] * len(limits)
        new = [
            (base if base > now else now) + d * r
            for base, d, r in zip(old, deltas, limits.inv_rates, strict=False)
        ]
        if state is not None:
            state[:] = new
        elif max(new) > now:  # a charge on an absent (full) key: it now holds state
            buckets.now = now
            buckets[key] = new
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
