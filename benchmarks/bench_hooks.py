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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client import CollectorRegistry, Counter, Histogram

from _common import bar, parse_args, print_bars, print_table, summary, write_json
from servekit.bench.hooks import NoopHook, measure_hooks, sizes
from servekit.metrics import PrometheusHook, StatsHook
from servekit.metrics.events import NewTokens
from servekit.metrics.hooks import Hook
from servekit.metrics.prometheus import ITL_BUCKETS


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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = sizes(args.quick, args.rounds)
    steps, rounds, batch = size["steps"], size["rounds"], size["batch"]

    names = list(configs())
    measured = measure_hooks(configs(), batch=batch, steps=steps, rounds=rounds)
    samples = {key: m["cpu"] for key, m in measured.items()}
    wall = {key: m["wall"] for key, m in measured.items()}

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
