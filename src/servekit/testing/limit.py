"""The limiter-store kit: bucket bounds, atomic multi-limit decisions, reserve/settle
conservation, concurrency and outages, checked through the :class:`~servekit.limit.Store`
protocol and a real :class:`~servekit.limit.Limiter`::

    class TestMyStore(LimiterStoreContract):
        store_factory = MyStore

Every check uses fresh keys, so one store serves all examples. Times are the store's own (the
``now`` each operation returns), so stores with their own clock (Redis ``TIME``) pass too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.errors import ServekitError
from servekit.limit import Limit, Limiter, Store, StoreUnavailableError
from servekit.limit.bucket import LimitSet
from servekit.limit.store import TakeResult
from servekit.testing._check import check, check_interface
from servekit.testing._run import kit_settings, run_given
from servekit.testing.clock import FakeClock

StoreFactory = Callable[[], Store]

#: A refill slow enough that a test's own duration changes no decision.
SLOW = 1e-3
_keys = itertools.count()


def _fresh_key(prefix: str) -> str:
    return f"servekit-kit:{prefix}:{next(_keys)}"


class UnavailableStore:
    """A store whose backend is down: every operation raises StoreUnavailableError."""

    def _down(self, *args: Any) -> TakeResult:
        raise StoreUnavailableError("store unavailable: backend down (servekit.testing)")

    take = peek = adjust = _down

    async def atake(self, *args: Any) -> TakeResult:
        return self._down()

    async def apeek(self, *args: Any) -> TakeResult:
        return self._down()

    async def aadjust(self, *args: Any) -> TakeResult:
        return self._down()


class LimiterStoreContract:
    """Conformance tests for a limiter store; subclass with ``store_factory``.

    Options: ``max_examples``, ``seed`` (None: derandomized), ``concurrency`` (tasks racing in
    the concurrency check), ``thread_safe`` (also race sync ``take`` from threads), and
    :meth:`break_store` (return a store of the same kind whose backend is unreachable; by
    default an :class:`UnavailableStore` stands in).
    """

    store_factory: ClassVar[StoreFactory]
    max_examples: ClassVar[int] = 30
    seed: ClassVar[int | None] = None
    concurrency: ClassVar[int] = 32
    thread_safe: ClassVar[bool] = False

    def make_store(self) -> Store:
        """A fresh store from ``store_factory``."""
        factory = getattr(type(self), "store_factory", None)
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set store_factory")
        return factory()  # type: ignore[no-any-return]

    def break_store(self, store: Store) -> Store | None:
        """A store like ``store`` whose backend is unreachable, or None for the stand-in."""
        return None

    def _settings(self) -> settings:
        return kit_settings(type(self).max_examples, 1, type(self).seed)

    def test_implements_the_interface(self) -> None:
        """The store implements the Store protocol at servekit's version."""
        check_interface(self.make_store(), "limiter_store")

    def test_greedy_client_bound(self) -> None:
        """Over any window [t_i, t_j], admitted cost <= capacity + rate * (t_j - t_i)."""
        store = self.make_store()

        @given(capacity=st.integers(1, 200), rate=st.sampled_from([0.5, 2.0, 16.0, 250.0]),
               ops=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1.0)),
                            min_size=1, max_size=40))
        def greedy(capacity: int, rate: float, ops: list[tuple[float, float]]) -> None:
            limits = LimitSet([Limit("x", capacity, rate)])
            key, clock = _fresh_key("greedy"), FakeClock(1000.0)
            admitted: list[tuple[float, float]] = []
            for dt, fraction in ops:
                clock.advance(dt)
                cost = fraction * capacity
                ok, now, _ = store.take(key, limits, (cost,), clock())
                if ok:
                    admitted.append((now, cost))
            for i in range(len(admitted)):
                total = 0.0
                for j in range(i, len(admitted)):
                    total += admitted[j][1]
                    bound = capacity + rate * (admitted[j][0] - admitted[i][0])
                    check(total <= bound * (1 + 1e-6) + 1e-6,
                          "a greedy client gets at most capacity + rate * T",
                          f"admitted {total:g} in {admitted[j][0] - admitted[i][0]:g} s, "
                          f"bound {bound:g} (capacity {capacity}, rate {rate})")

        run_given(greedy, self._settings(), type(self).seed)

    def test_full_bucket_admits_its_capacity(self) -> None:
        """A new key admits exactly ``floor(capacity)`` unit costs, then denies."""
        store = self.make_store()
        for capacity in (1, 7, 50):
            limits = LimitSet([Limit("x", capacity, SLOW)])
            key = _fresh_key("burst")
            got = sum(store.take(key, limits, (1.0,), 0.0)[0] for _ in range(capacity + 3))
            check(got == capacity, "a full bucket admits its capacity, no more",
                  f"capacity {capacity}: admitted {got}")

    def test_multi_limit_decisions_are_atomic(self) -> None:
        """A check charges every limit or none: a denial leaves every bucket as it was."""
        store = self.make_store()

        @given(caps=st.lists(st.integers(1, 50), min_size=2, max_size=3),
               ops=st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), max_size=30))
        def atomic(caps: list[int], ops: list[list[int]]) -> None:
            names = [f"l{i}" for i in range(len(caps))]
            limiter = Limiter([Limit(n, c, SLOW) for n, c in zip(names, caps, strict=False)],
                              store=store)
            key = _fresh_key("atomic")
            for raw in ops:
                cost = {n: min(c, v) for n, c, v in zip(names, caps, raw, strict=False)}
                before = [s.remaining for s in limiter.peek(key).statuses]
                decision = limiter.try_acquire(key, cost)
                after = [s.remaining for s in limiter.peek(key).statuses]
                if decision.allowed:
                    for b, a, n in zip(before, after, names, strict=False):
                        check(math.isclose(a, b - cost[n], abs_tol=0.01),
                              "an admitted check charges every limit",
                              f"limit {n}: {b:g} - {cost[n]:g} != {a:g}")
                    continue
                check(_close(before, after), "a denied check charges no limit",
                      f"remaining before {before}, after {after}, cost {cost}")
                check(all(before[names.index(n)] < cost[n] + 0.01 for n in decision.denied_by)
                      and decision.denied_by, "a denial names a limit that lacked tokens",
                      f"denied_by {decision.denied_by}, remaining {before}, cost {cost}")

        run_given(atomic, self._settings(), type(self).seed)

    def test_reserve_settle_conserves_tokens(self) -> None:
        """Reserving c then settling with u leaves exactly u charged; refunds never overfill."""
        store = self.make_store()

        @given(costs=st.lists(st.integers(0, 20), min_size=1, max_size=20))
        def conserve(costs: list[int]) -> None:
            limiter = Limiter([Limit("tokens", 1000, SLOW)], store=store)
            key = _fresh_key("settle")
            charged = 0
            for c in costs:
                d = limiter.try_acquire(key, c, reserve=True)
                check(d.allowed and d.reservation is not None, "a reservation is returned",
                      f"cost {c}")
                assert d.reservation is not None
                used = c // 2 if c % 3 else c + 5
                check(limiter.settle(d.reservation, used), "an open reservation settles")
                charged += used
            remaining = limiter.peek(key).status("tokens").remaining
            check(math.isclose(remaining, max(0, 1000 - charged), abs_tol=0.05),
                  "reserve/settle conservation",
                  f"charged {charged} in total, remaining {remaining:g} of 1000")
            refund = limiter.try_acquire(key, 0, reserve=True)
            assert refund.reservation is not None
            limiter.settle(refund.reservation, 0)
            after = limiter.peek(key).status("tokens").remaining
            check(after <= 1000 + 1e-6, "a refund never overfills the bucket", f"{after:g}")

        run_given(conserve, self._settings(), type(self).seed)

    def test_concurrent_takes_never_over_admit(self) -> None:
        """Racing ``atake`` calls (and sync ``take`` from threads, when ``thread_safe``) admit
        exactly the capacity of a bucket that does not refill."""
        store = self.make_store()
        n, capacity = type(self).concurrency, max(1, type(self).concurrency // 3)
        limits = LimitSet([Limit("x", capacity, SLOW), Limit("y", 10 * capacity, SLOW)])
        key = _fresh_key("race")
        admitted: list[bool] = []

        async def one() -> None:
            ok, _, _ = await store.atake(key, limits, (1.0, 1.0), 0.0)
            admitted.append(ok)

        async def race() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)

        anyio.run(race)
        _check_race(sum(admitted), capacity, "tasks")
        if type(self).thread_safe:
            from concurrent.futures import ThreadPoolExecutor

            key = _fresh_key("threads")
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda _: store.take(key, limits, (1.0, 1.0), 0.0)[0],
                                    range(n)))
            _check_race(sum(got), capacity, "threads")

    def test_store_failure_follows_fail_open(self) -> None:
        """When the store is unreachable the limiter (sync and async) allows (fail_open) or
        denies, and says so; the store itself raises StoreUnavailableError."""
        store = self.make_store()
        broken = self.break_store(store)
        limits = [Limit("requests", 5, SLOW)]
        if broken is not None:
            try:
                broken.take("k", LimitSet(limits), (1.0,), 0.0)
            except StoreUnavailableError:
                pass
            except Exception as exc:
                check(False, "an unreachable store raises StoreUnavailableError",
                      f"{type(broken).__name__}.take raised {exc!r}")
            else:
                check(False, "an unreachable store raises StoreUnavailableError",
                      f"{type(broken).__name__}.take returned")
        else:
            broken = UnavailableStore()
        for fail_open in (True, False):
            limiter = Limiter(limits, store=broken, fail_open=fail_open, error_retry_after=2.5)
            for d in (limiter.try_acquire("k"), limiter.peek("k", 1)):
                check(d.allowed is fail_open and d.error is not None,
                      "store failure follows fail_open",
                      f"fail_open={fail_open}: allowed={d.allowed}, error={d.error!r}")
                check(d.retry_after == (0.0 if fail_open else 2.5),
                      "store failure follows fail_open", f"retry_after {d.retry_after}")
            check(_acquire_outcome(limiter) == ("allowed" if fail_open else "denied"),
                  "store failure follows fail_open",
                  f"fail_open={fail_open}: async acquire was {_acquire_outcome(limiter)}")


def _acquire_outcome(limiter: Limiter) -> str:
    """What ``await limiter.acquire("k")`` did: allowed, denied (RateLimitExceeded), or else."""
    async def go() -> str:
        try:
            decision = await limiter.acquire("k", max_wait=0.5)
        except ServekitError as exc:  # the limiter's rate-limit error carries the decision
            denied = getattr(exc, "decision", None)
            if denied is None:
                raise
            return "denied" if denied.error is not None else f"denied without error: {exc}"
        return "allowed" if decision.allowed and decision.error is not None else str(decision)

    return anyio.run(go)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(math.isclose(x, y, abs_tol=0.01) for x, y in zip(a, b, strict=True))


def _check_race(got: int, capacity: int, who: str) -> None:
    check(got <= capacity, "no over-admission under concurrency",
          f"{got} racing {who} admitted by a bucket of capacity {capacity}")
    check(got == capacity, "a full bucket admits its capacity, no more",
          f"{got} racing {who} admitted by a bucket of capacity {capacity}")


def limiter_store_contract(store_factory: StoreFactory,
                           **options: Any) -> type[LimiterStoreContract]:
    """A :class:`LimiterStoreContract` subclass for ``store_factory`` (assign it to a
    ``Test*`` name)."""
    return type("TestLimiterStore", (LimiterStoreContract,),
                {"store_factory": staticmethod(store_factory), **options})
