"""Cost of a new-token event at the producer: 0, 1, 3 hooks, stats, and the Prometheus exporter.

A decode step of B running requests (4 tenants) emits one ``NewTokens`` per request (one token
each, the common decode case) exactly as a producer does: check ``hooks.wants.new_tokens``,
build the event, call ``hooks.on_new_tokens``. The peer is the same hook written the usual way
with prometheus_client objects (``Histogram.labels(...).observe`` + ``Counter.labels(...).inc``
per event), on its own registry, in the same process. Rounds are interleaved across the
configurations. Columns: microseconds per token event, with and without building the event.
Times are this thread's CPU time (``time.thread_time``), so a busy shared machine inflates
them less than wall time; the JSON also keeps the wall-clock medians.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client import CollectorRegistry, Counter, Histogram

from _common import bar, parse_args, print_bars, print_table, summary, write_json
from servekit.metrics import HookSet, PrometheusHook, StatsHook
from servekit.metrics.events import NewTokens
from servekit.metrics.hooks import Hook
from servekit.metrics.prometheus import ITL_BUCKETS


class NoopHook(Hook):
    """Listens to new tokens and does nothing: the cost of dispatch alone."""

    def on_new_tokens(self, event: NewTokens) -> None:
        pass


class PrometheusClientHook(Hook):
    """The peer: the same ITL histogram and token counter through prometheus_client objects."""

    def __init__(self, model_name: str) -> None:
        registry = CollectorRegistry()
        labels = ["model_name", "tenant"]
        self.model_name = model_name
        self.itl = Histogram(
            "peer:inter_token_latency_seconds", "ITL", labels, buckets=ITL_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.tokens = Counter("peer:generation_tokens", "tokens", labels, registry=registry)

    def on_new_tokens(self, event: NewTokens) -> None:
        tenant = event.tenant or ""
        n = event.num_tokens
        itl = (event.time - event.previous_time) / n
        self.itl.labels(self.model_name, tenant).observe(itl)  # one observe per event (mean)
        self.tokens.labels(self.model_name, tenant).inc(n)


def configs() -> dict[str, Callable[[], list[Hook]]]:
    return {
        "0 hooks": list,
        "1 hook (no-op)": lambda: [NoopHook()],
        "3 hooks (no-op)": lambda: [NoopHook(), NoopHook(), NoopHook()],
        "stats": lambda: [StatsHook()],
        "prometheus": lambda: [PrometheusHook("bench")],
        "prometheus + 2 no-op": lambda: [PrometheusHook("bench"), NoopHook(), NoopHook()],
        "peer: prometheus_client": lambda: [PrometheusClientHook("bench")],
    }


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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds = args.rounds or (7 if args.quick else 21)
    steps = 150 if args.quick else 1000
    batch = 64
    events = steps * batch

    names = list(configs())
    runs: dict[tuple[str, bool], Callable[[float], None]] = {}
    for name, factory in configs().items():
        for build in (True, False):
            runs[name, build] = make_step(HookSet(factory()), batch, build)
    samples: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    wall: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, step in runs.items():
            start, start_wall = time.thread_time(), time.perf_counter()
            for s in range(steps):
                step(float(s))
            samples[key].append((time.thread_time() - start) / events * 1e6)
            wall[key].append((time.perf_counter() - start_wall) / events * 1e6)

    peer = statistics.median(samples["peer: prometheus_client", True])
    rows = []
    for name in names:
        built = summary(samples[name, True])
        dispatch = summary(samples[name, False])
        rows.append({
            "config": name,
            "us_per_event": built["median"],
            "min": built["min"],
            "max": built["max"],
            "us_dispatch_only": dispatch["median"],
            "peer_over_this": peer / built["median"],
            "wall_us_per_event": statistics.median(wall[name, True]),
        })  # fmt: skip
    print_table(
        rows,
        ["config", "us_per_event", "min", "max", "us_dispatch_only", "peer_over_this"],
        title=f"new-token events: us per event (1 token each), decode batch {batch}, "
        f"{steps} steps x {rounds} rounds, thread CPU time; us_per_event includes building "
        "the event",
    )
    prom = next(r for r in rows if r["config"] == "prometheus")
    bars = {
        "prometheus_us_per_token_event": bar(prom["us_per_event"], 1.0, higher_is_better=False),
    }
    print_bars(bars)
    write_json(args.json, "hooks", rows, bars, batch=batch, steps=steps, rounds=rounds)


if __name__ == "__main__":
    main()
