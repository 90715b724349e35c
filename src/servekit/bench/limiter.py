"""Limiter checks per second, for any store, in three scenarios.

One key saturated (10/s: almost every check denied), one key never limited, and 100k keys
round-robin (every check a different key). Implementations are measured in interleaved rounds
(the same machine noise for all); a check is ``Limiter.try_acquire(key).allowed`` (one limit,
or RPM + TPM together with ``two=True``) or any callable ``key -> bool`` (a peer library).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from servekit.limit import Limit, Limiter, Store

#: never limits anything
BIG = 10**9
#: scenario -> (rate and capacity per key, number of keys)
SCENARIOS: dict[str, tuple[float, int]] = {
    "1 key saturated": (10, 1),
    "1 key never limited": (BIG, 1),
    "100k keys": (BIG, 100_000),
}
Check = Callable[[str], bool]
CheckMaker = Callable[[float], Check]


def store_checker(rate: float, capacity: float, *, two: bool = False,
                  store: Store | None = None) -> Check:
    """``key -> allowed`` through a :class:`Limiter` on ``store`` (default: memory)."""
    lims = [Limit("requests", capacity, rate)]
    if two:
        lims.append(Limit("tokens", capacity * 100, rate * 100))
    limiter = Limiter(lims, store=store)
    try_acquire = limiter.try_acquire
    return lambda key: try_acquire(key).allowed


def rate_of(check: Check, keys: Sequence[str], n: int) -> float:
    """Checks per second of ``n`` checks over ``keys`` in turn."""
    nk = len(keys)
    start = time.perf_counter()
    if nk == 1:
        key = keys[0]
        for _ in range(n):
            check(key)
    else:
        for i in range(n):
            check(keys[i % nk])
    return n / (time.perf_counter() - start)


def compare_checks(makers: Mapping[str, CheckMaker], *, n: int, rounds: int,
                   scenarios: Mapping[str, tuple[float, int]] = SCENARIOS,
                   ) -> dict[str, dict[str, list[float]]]:
    """``{scenario: {impl: [checks/s per round]}}``; each maker gets the scenario's rate.

    A one-key scenario runs ``n`` checks per round, a many-key one a check per key."""
    out: dict[str, dict[str, list[float]]] = {}
    for scenario, (rate, num_keys) in scenarios.items():
        keys = ["k"] if num_keys == 1 else [f"user-{i}" for i in range(num_keys)]
        count = n if num_keys == 1 else num_keys
        checks = {name: make(rate) for name, make in makers.items()}
        samples: dict[str, list[float]] = {name: [] for name in checks}
        for _ in range(rounds):
            for name, check in checks.items():
                samples[name].append(rate_of(check, keys, count))
        out[scenario] = samples
    return out
