"""The keyed, multi-limit :class:`Limiter`: sync checks, async FIFO waits, reserve and settle."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import anyio
from cachetools import TTLCache

from servekit._validators import int_at_least, prefixed
from servekit.limit.bucket import Limit, LimitSet
from servekit.limit.decision import Decision, RateLimitExceededError, Reservation
from servekit.limit.errors import (
    InvalidCostError,
    LimitConfigError,
    RequestTooLargeError,
    ReservationError,
    StoreUnavailableError,
)
from servekit.limit.store import MemoryStore, Store, TakeResult, store_from_url
from servekit.metrics.events import RateLimitDecision
from servekit.metrics.hooks import HookSet

#: A cost: one number for every limit, or a mapping of limit name to cost (missing names: 0).
Cost = float | Mapping[str, float]


class _Waiter:
    """One task in a key's line; ``decision`` is set when the head granted it its cost."""

    __slots__ = ("costs", "decision", "event", "queued", "reserve")

    def __init__(self, costs: tuple[float, ...], reserve: bool) -> None:
        self.costs = costs
        self.reserve = reserve
        self.event = anyio.Event()
        self.decision: Decision | None = None
        self.queued = True


class Limiter:
    """Token-bucket rate limits per key: several named limits, checked and taken together.

    ``Limiter([Limit.per_minute("requests", 60), Limit.per_minute("tokens", 90_000)])`` gives
    every key OpenAI-style RPM and TPM. A check charges all limits or none. Costs are one number
    for every limit or a ``{name: cost}`` mapping (limits it leaves out are checked at cost 0).

    - ``try_acquire`` decides now; ``acquire`` (async, anyio) waits in FIFO order per key up to
      ``max_wait`` seconds or a ``deadline``, then raises :class:`RateLimitExceededError`.
    - ``reserve=True`` returns a :class:`Reservation` on the decision; ``settle`` it with the
      real usage to refund or charge the difference. Unsettled, it expires after
      ``reservation_ttl`` seconds and its charge stands.
    - ``shadow=True`` decides and reports but always allows (``Decision.conforming`` tells).
    - When the store is unreachable, ``fail_open`` chooses to allow or deny; ``Decision.error``
      says so either way.
    - ``hooks`` receive a ``RateLimitDecision`` for every decision returned or raised.
    - ``store`` is any :class:`~servekit.limit.store.Store` or a store URL (``memory://``,
      ``redis://host:port/db``, a plugin's scheme); default: a fresh in-process
      :class:`~servekit.limit.store.MemoryStore`. Every store goes through the same calls.

    ``clock`` is the time source for memory state and reservations; for ``acquire`` it must run
    at the event loop's pace (the default ``time.monotonic`` does, as does ``anyio.current_time``).
    Like every servekit part it is not thread-safe: one limiter per thread or event loop.
    """

    def __init__(
        self,
        limits: Iterable[Limit],
        *,
        store: Store | str | None = None,
        clock: Callable[[], float] = time.monotonic,
        shadow: bool = False,
        fail_open: bool = False,
        error_retry_after: float = 1.0,
        max_wait: float = 60.0,
        max_waiters: int = 10_000,
        reservation_ttl: float = 600.0,
        max_reservations: int = 1_000_000,
        hooks: HookSet | None = None,
    ) -> None:
        self.limits = LimitSet(limits)
        if isinstance(store, str):
            store = store_from_url(store)
        self.store: Store = MemoryStore() if store is None else store
        self.shadow = shadow
        self.fail_open = fail_open
        _check_seconds("max_wait", max_wait)
        _check_seconds("error_retry_after", error_retry_after)
        _check_seconds("reservation_ttl", reservation_ttl)
        for name, count in (("max_waiters", max_waiters), ("max_reservations", max_reservations)):
            _NON_NEGATIVE.check(name, count)
        self.max_wait = max_wait
        self.max_waiters = max_waiters
        self.error_retry_after = error_retry_after
        self.reservation_ttl = reservation_ttl
        self._clock = clock
        self._hooks = hooks
        self._ones: tuple[float, ...] | None = (
            (1.0,) * len(self.limits) if min(self.limits.capacities) >= 1.0 else None
        )
        self._open: TTLCache[Reservation, None] = TTLCache(
            max_reservations, reservation_ttl, timer=clock
        )
        self._queues: dict[str, deque[_Waiter]] = {}
        self._num_waiters = 0

    # -- costs ---------------------------------------------------------------------------------

    def costs(self, cost: Cost, *, check_capacity: bool = True) -> tuple[float, ...]:
        """Resolve ``cost`` to one cost per limit, in order; raise on bad input."""
        lim = self.limits
        if type(cost) is dict or isinstance(cost, Mapping):
            out = [0.0] * len(lim)
            index = lim.index
            for name, value in cost.items():
                i = index.get(name)
                if i is None:
                    raise InvalidCostError(
                        f"unknown limit {name!r}; this limiter has {list(lim.names)}"
                    )
                kind = type(value)
                # plain ints and floats in [0, inf) (NaN fails the comparison) skip the checks
                out[i] = value if (kind is int or kind is float) and 0 <= value < _INF else (
                    _check_cost(name, value))
            resolved = tuple(out)
        else:
            value = _check_cost(None, cost)
            resolved = (value,) * len(lim)
        if check_capacity:
            caps = lim.capacities
            for i, value in enumerate(resolved):
                if value > caps[i]:
                    raise RequestTooLargeError(
                        f"cost {value:g} exceeds the capacity {caps[i]:g} "
                        f"of limit {lim.names[i]!r}"
                    )
        return resolved

    # -- sync ----------------------------------------------------------------------------------

    def try_acquire(self, key: str, cost: Cost = 1.0, *, reserve: bool = False) -> Decision:
        """Decide now: charge ``cost`` to all of ``key``'s limits if they all admit it."""
        costs = self._ones if cost == 1.0 and self._ones is not None else self.costs(cost)
        try:
            result = self.store.take(key, self.limits, costs, self._clock())
        except StoreUnavailableError as exc:
            return self._report(self._store_error(key, costs, exc))
        return self._taken(key, costs, result, reserve)

    async def atry_acquire(self, key: str, cost: Cost = 1.0, *, reserve: bool = False
                           ) -> Decision:
        """Async :meth:`try_acquire`: a store's round trip does not block the event loop."""
        costs = self._ones if cost == 1.0 and self._ones is not None else self.costs(cost)
        try:
            result = await self.store.atake(key, self.limits, costs, self._clock())
        except StoreUnavailableError as exc:
            return self._report(self._store_error(key, costs, exc))
        return self._taken(key, costs, result, reserve)

    def _taken(self, key: str, costs: tuple[float, ...], result: TakeResult, reserve: bool
               ) -> Decision:
        decision = self._decision(key, costs, result, reserve)
        hooks = self._hooks
        if hooks is not None and hooks.wants.rate_limit:
            self._report(decision)
        return decision

    def peek(self, key: str, cost: Cost = 0.0) -> Decision:
        """The decision ``try_acquire`` would make, charging nothing (for status headers)."""
        costs = self.costs(cost)
        try:
            result = self.store.peek(key, self.limits, costs, self._clock())
        except StoreUnavailableError as exc:
            return self._store_error(key, costs, exc)
        return self._decision(key, costs, result, False)

    def settle(self, reservation: Reservation, used: Cost = 0.0) -> bool:
        """Settle ``reservation`` with the real usage: refund or charge the difference.

        Returns False when the reservation had already expired (its charge stands, nothing is
        changed). Raises :class:`ReservationError` when it was settled before.
        """
        deltas = self._settle_deltas(reservation, used)
        if deltas is None:
            return False
        self.store.adjust(reservation.key, self.limits, deltas, self._clock())
        return True

    @property
    def open_reservations(self) -> int:
        """Reservations taken and neither settled nor expired."""
        self._open.expire()
        return len(self._open)

    @property
    def num_waiters(self) -> int:
        """Tasks waiting in ``acquire`` across all keys."""
        return self._num_waiters

    # -- async ---------------------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        cost: Cost = 1.0,
        *,
        max_wait: float | None = None,
        deadline: float | None = None,
        reserve: bool = False,
    ) -> Decision:
        """Wait in FIFO order for ``key`` until ``cost`` is admitted, then charge it.

        Waits at most ``max_wait`` seconds (default: the limiter's) and never past ``deadline``
        (a time on the limiter's clock). Raises :class:`RateLimitExceededError` at once when the wait
        could not succeed in time or ``max_waiters`` tasks already wait, else when time runs
        out. A cancelled waiter takes nothing and leaves the queue.
        """
        costs = self._ones if cost == 1.0 and self._ones is not None else self.costs(cost)
        queued = key in self._queues
        if not queued:
            try:  # _atake, inlined: one coroutine frame less on every admitted request
                result = await self.store.atake(key, self.limits, costs, self._clock())
            except StoreUnavailableError as exc:
                decision = self._store_error(key, costs, exc)
            else:
                decision = self._decision(key, costs, result, reserve)
            if decision.allowed:
                hooks = self._hooks
                if hooks is not None and hooks.wants.rate_limit:
                    self._report(decision)
                return decision
        return await self._wait(key, costs, None if queued else decision, max_wait, deadline,
                                reserve)

    async def _wait(
        self,
        key: str,
        costs: tuple[float, ...],
        denied: Decision | None,
        max_wait: float | None,
        deadline: float | None,
        reserve: bool,
    ) -> Decision:
        """Join ``key``'s line (``denied``: the check that failed, None if a line was there)."""
        budget = self.max_wait if max_wait is None else _check_seconds("max_wait", max_wait)
        if deadline is not None:
            budget = min(budget, deadline - self._clock())
        if denied is not None and denied.retry_after > budget:
            raise self._deny(denied, "limit")
        if self._num_waiters >= self.max_waiters:
            raise self._deny(await self._apeek(key, costs), "waiters")
        queue = self._queues.setdefault(key, deque())
        waiter = _Waiter(costs, reserve)
        queue.append(waiter)
        self._num_waiters += 1
        try:
            with anyio.move_on_after(budget):
                wait_until = anyio.current_time() + budget
                while True:
                    if not waiter.queued or queue[0] is not waiter:
                        await waiter.event.wait()
                        waiter.event = anyio.Event()
                        granted, waiter.decision = waiter.decision, None
                        if granted is not None:
                            return self._report(granted)
                        continue
                    decision = await self._atake(key, costs, reserve)
                    if decision.allowed:
                        await self._grant_followers(key, queue)
                        return self._report(decision)
                    if decision.retry_after > wait_until - anyio.current_time():
                        raise self._deny(decision, "limit")
                    await anyio.sleep(decision.retry_after)
        finally:
            granted, waiter.decision = waiter.decision, None
            self._leave(key, queue, waiter)
            if granted is not None:  # granted by the head, but cancelled before it returned
                await self._refund(granted)
        raise self._deny(await self._apeek(key, costs), "timeout")

    def _leave(self, key: str, queue: deque[_Waiter], waiter: _Waiter) -> None:
        """Take ``waiter`` out of line (if the head has not granted it already); pass the turn
        on."""
        if not waiter.queued:
            return
        was_head = queue[0] is waiter
        queue.remove(waiter)
        waiter.queued = False
        self._num_waiters -= 1
        if was_head:
            self._next_turn(key, queue)
        elif not queue:
            del self._queues[key]

    def _next_turn(self, key: str, queue: deque[_Waiter]) -> None:
        """Wake the line's new head to try for itself (or drop the empty line)."""
        if queue:
            queue[0].event.set()
        else:
            del self._queues[key]

    async def _grant_followers(self, key: str, queue: deque[_Waiter]) -> None:
        """The head was admitted: grant the waiters behind it, in order, while the store
        admits them. One pass instead of a task switch per waiter is what keeps a long line at
        the configured rate (with an in-process store none of these awaits checkpoints)."""
        while len(queue) > 1:
            follower = queue[1]
            decision = await self._atake(key, follower.costs, follower.reserve)
            if not follower.queued:  # it left the line while the store answered
                if decision.allowed:
                    await self._refund(decision)
                continue
            if not decision.allowed:
                return
            queue.remove(follower)
            follower.queued = False
            self._num_waiters -= 1
            follower.decision = decision
            follower.event.set()

    async def _refund(self, decision: Decision) -> None:
        if decision.reservation is not None:
            self._open.pop(decision.reservation, None)
        negative = tuple(-c for c in decision.costs)
        # a refund is best-effort: with the store down, the charge stands
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreUnavailableError):
            await self.store.aadjust(decision.key, self.limits, negative, self._clock())

    async def _atake(self, key: str, costs: tuple[float, ...], reserve: bool) -> Decision:
        # no shield here: the Store contract makes atake return or have no effect when the
        # task is cancelled (a store doing I/O shields its own round trip)
        try:
            result = await self.store.atake(key, self.limits, costs, self._clock())
        except StoreUnavailableError as exc:
            return self._store_error(key, costs, exc)
        return self._decision(key, costs, result, reserve)

    async def _apeek(self, key: str, costs: tuple[float, ...]) -> Decision:
        try:
            result = await self.store.apeek(key, self.limits, costs, self._clock())
        except StoreUnavailableError as exc:
            return self._store_error(key, costs, exc)
        return self._decision(key, costs, result, False)

    async def asettle(self, reservation: Reservation, used: Cost = 0.0) -> bool:
        """Async :meth:`settle`."""
        deltas = self._settle_deltas(reservation, used)
        if deltas is None:
            return False
        with anyio.CancelScope(shield=True):
            await self.store.aadjust(reservation.key, self.limits, deltas, self._clock())
        return True

    # -- shared --------------------------------------------------------------------------------

    def _decision(
        self, key: str, costs: tuple[float, ...], result: TakeResult, reserve: bool
    ) -> Decision:
        conforming, now, full_at = result
        decision = Decision(key, self.limits, costs, conforming, now, full_at, self.shadow)
        if reserve and conforming:
            self._reserve(decision)
        return decision

    def _reserve(self, decision: Decision) -> None:
        res = Reservation(decision.key, decision.costs, self._clock() + self.reservation_ttl)
        self._open[res] = None
        decision.reservation = res

    def _settle_deltas(self, reservation: Reservation, used: Cost) -> tuple[float, ...] | None:
        if reservation.settled:
            raise ReservationError(f"{reservation!r} was already settled")
        actual = self.costs(used, check_capacity=False)
        reservation.settled = True
        if self._open.pop(reservation, _MISSING) is _MISSING:
            return None
        return tuple(a - c for a, c in zip(actual, reservation.costs, strict=False))

    def _store_error(self, key: str, costs: tuple[float, ...], exc: Exception) -> Decision:
        now = self._clock()
        decision = Decision(
            key, self.limits, costs, self.fail_open, now, (now,) * len(self.limits), self.shadow
        )
        policy = "fail-open" if self.fail_open else "fail-closed"
        decision.error = f"store unavailable ({policy}): {exc}"
        decision._retry_after = 0.0 if self.fail_open else self.error_retry_after
        return decision

    def _report(self, decision: Decision) -> Decision:
        hooks = self._hooks
        if hooks is not None and hooks.wants.rate_limit:
            hooks.on_rate_limit(
                RateLimitDecision(
                    key=decision.key,
                    allowed=decision.conforming,
                    retry_after=decision.retry_after,
                    shadow=decision.shadow,
                    time=self._clock(),
                )
            )
        return decision

    def _deny(self, decision: Decision, reason: str) -> RateLimitExceededError:
        self._report(decision)
        return RateLimitExceededError(decision, reason)


_MISSING = object()
_NON_NEGATIVE = int_at_least(0, error=prefixed(LimitConfigError))
_INF = math.inf


def _check_cost(name: str | None, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        label = "cost" if name is None else f"cost of limit {name!r}"
        raise InvalidCostError(f"{label} must be a number, got {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        label = "cost" if name is None else f"cost of limit {name!r}"
        raise InvalidCostError(f"{label} must be finite and >= 0, got {value!r}")
    return float(value)


def _check_seconds(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
        raise LimitConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)
