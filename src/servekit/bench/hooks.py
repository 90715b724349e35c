"""Cost of a new-token event at the producer, for any hook configuration.

A decode step of ``batch`` running requests (4 tenants) emits one ``NewTokens`` per request
(one token each, the common decode case) exactly as a producer does: check
``hooks.wants.new_tokens``, build the event, call ``hooks.on_new_tokens``. Configurations are
measured in interleaved rounds (the same machine noise for all), in this thread's CPU time
(``time.thread_time``: a busy shared machine inflates it less than wall time), in
microseconds per event, with and without building the event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from servekit.metrics.events import NewTokens
from servekit.metrics.hooks import Hook, HookSet

HooksFactory = Callable[[], list[Hook]]


class NoopHook(Hook):
    """Listens to new tokens and does nothing: the cost of dispatch alone."""

    def on_new_tokens(self, event: NewTokens) -> None:
        pass


def make_step(hooks: HookSet, batch: int, build: bool) -> Callable[[float], None]:
    """One decode step's events; ``build=False`` reuses prebuilt events (dispatch only)."""
    ids = [f"req-{i}" for i in range(batch)]
    tenants = [f"tenant-{i % 4}" for i in range(batch)]
    gaps = [0.005 + 0.01 * (i % 16) for i in range(batch)]  # spread over ITL buckets
    rows = list(zip(ids, tenants, gaps, strict=True))
    prebuilt = [NewTokens(r, t, 1, 1.0 - g, 1.0) for r, t, g in rows]

    if build:

        def step(now: float) -> None:
            wants = hooks.wants
            for request_id, tenant, gap in rows:
                if wants.new_tokens:
                    hooks.on_new_tokens(NewTokens(request_id, tenant, 1, now - gap, now))

    else:

        def step(now: float) -> None:
            wants = hooks.wants
            for event in prebuilt:
                if wants.new_tokens:
                    hooks.on_new_tokens(event)

    return step


def measure_hooks(configs: Mapping[str, HooksFactory], *, batch: int = 64, steps: int = 1000,
                  rounds: int = 21) -> dict[tuple[str, bool], dict[str, list[float]]]:
    """``{(config, built): {"cpu": [us per event per round], "wall": [...]}}``."""
    runs = {(name, build): make_step(HookSet(factory()), batch, build)
            for name, factory in configs.items() for build in (True, False)}
    out: dict[tuple[str, bool], dict[str, list[float]]] = {
        key: {"cpu": [], "wall": []} for key in runs}
    events = steps * batch
    for _ in range(rounds):
        for key, step in runs.items():
            start, start_wall = time.thread_time(), time.perf_counter()
            for s in range(steps):
                step(float(s))
            out[key]["cpu"].append((time.thread_time() - start) / events * 1e6)
            out[key]["wall"].append((time.perf_counter() - start_wall) / events * 1e6)
    return out


def sizes(quick: bool, rounds: int | None) -> dict[str, Any]:
    """Steps, rounds and batch of the standard and ``--quick`` runs."""
    return {"steps": 150 if quick else 1000, "rounds": rounds or (7 if quick else 21),
            "batch": 64}
