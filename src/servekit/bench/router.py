"""Routing measurements: lookups per second, balance, keys moved on a membership change.

Ring level (``HashRing`` against a peer such as uhashring): :func:`scalar_rate`,
:func:`balance`, :func:`movement`, :func:`retained_bytes`. Router level (any routing policy
through a real :class:`~servekit.route.Router`): :func:`measure_policy` gives routes per second
(route + release per session key), the max/mean and min/mean of keys per replica (nothing in
flight: where keys go), the max/mean of in-flight requests when no request is released (what
load-aware policies balance), and the fraction of keys moved when one replica joins, as a
multiple of the ideal 1/N.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from servekit.route import Router, RoutingPolicy


def names(n: int, prefix: str = "node") -> list[str]:
    """``n`` node names ``prefix-0`` ... ``prefix-(n-1)``."""
    return [f"{prefix}-{i}" for i in range(n)]


def retained_bytes(build: Callable[[], Any]) -> tuple[Any, int]:
    """Build an object and return it with the bytes it keeps allocated (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, after - before


def balance(owners: Sequence[str] | np.ndarray, nodes: Sequence[str]) -> tuple[float, float]:
    """max/mean and min/mean of keys per node."""
    _, counts = np.unique(np.asarray(owners, dtype=object), return_counts=True)
    full = np.zeros(len(nodes))
    full[: len(counts)] = counts
    mean = full.sum() / len(nodes)
    return float(full.max() / mean), float(full.min() / mean)


def movement(before: Sequence[str], after: Sequence[str], changed: str) -> tuple[float, int]:
    """Fraction of keys that moved, and how many moved between two unchanged nodes."""
    moved = between = 0
    for b, a in zip(before, after, strict=True):
        if a != b:
            moved += 1
            if changed not in (a, b):
                between += 1
    return moved / len(before), between


def scalar_rate(lookup: Callable[[str], Any], keys: Sequence[str], rounds: int) -> list[float]:
    """Lookups per second of ``lookup`` over ``keys``, once per round."""
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for k in keys:
            lookup(k)
        out.append(len(keys) / (time.perf_counter() - start))
    return out


def owners(router: Router, keys: Sequence[str]) -> list[str]:
    """The replica each session key routes to, with nothing left in flight."""
    route, release = router.route, router.release
    out = []
    for key in keys:
        node = route(session_id=key).node
        release(node, None)
        out.append(node)
    return out


def measure_policy(factory: Callable[[], RoutingPolicy], *, replicas: int, keys: Sequence[str],
                   ) -> dict[str, float]:
    """Routes per second, balance and movement on +1 replica for one policy."""
    nodes = names(replicas, "replica")
    router = Router(nodes, policy=factory())
    start = time.perf_counter()
    before = owners(router, keys)
    rate = len(keys) / (time.perf_counter() - start)
    high, low = balance(before, nodes)
    held = Router(nodes, policy=factory())
    for key in keys:  # nothing released: what load-aware policies balance
        held.route(session_id=key)
    loads = held.loads
    router.add_replica("replica-new")
    moved, between = movement(before, owners(router, keys), "replica-new")
    return {"routes/s": rate, "max/mean keys": high, "min/mean keys": low,
            "max/mean in flight": max(loads.values()) / (sum(loads.values()) / len(loads)),
            "moved on +1 (x 1/N)": moved * (replicas + 1), "moved between unchanged": between}
