"""Ray Serve benchmark: what Ray's hops cost. One instant fake replica served three ways, side
by side in one run, rounds interleaved: the Ray application (Ray's HTTP proxy -> the
``OpenAIIngress`` replica -> a Ray handle stream -> the ``EngineReplica``), ``servekit gateway``
in front of one ``servekit serve --fake``, and that ``servekit serve --fake`` directly.

For each: streamed tokens/s (streams of ``max_tokens`` tokens, ``concurrency`` at a time,
counted from each stream's usage chunk: the Ray replica merges the deltas that queued up while
the previous Ray item travelled, so its events may carry several tokens), TTFT under that load (p50, p90), and TTFT of one stream at a time
(the hops' latency). Ratios to the gateway and to direct. Bar: the Ray ingress keeps >= 0.5x the
gateway's streamed tokens/s.

Routing: two fake replicas behind the Ray ingress, a multi-tenant workload (each tenant's
requests share a long system prompt), sent one at a time in a seeded random order; which replica
served each request is read from the replicas' request counters. A request "hits" when its
tenant's prefix was served on that replica before (an unbounded prefix cache); the oracle
misses only each tenant's first request. servekit's cache-aware router vs Ray Serve's default
router (``routing_policy = "ray"``: power of two choices on queue length), with servekit's
consistent-hash router beside them. The fake replicas report no KV events, so the cache-aware
policy sees no cached blocks here and decides on the reported loads (up to one stats period
old) and its rendezvous tie-break: this measures routing-key affinity, not the KV index.

    python benchmarks/bench_ray.py --quick --json benchmarks/results/ray-cpu-2026-12-06.json
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server
from _common import bar, parse_args, print_bars, print_table, summary, write_json
from bench_gateway import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
APP = "servekit-bench"


async def stream_with_ttft(url: str, concurrency: int, max_tokens: int,
                           streams: int) -> tuple[int, float, list[float], int]:
    """``streams`` streamed completions, ``concurrency`` at a time: (tokens, seconds, TTFTs,
    SSE events with tokens)."""
    body = {"model": "fake", "prompt": "hello", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    ttfts: list[float] = []
    events = 0

    async def one(conn: bench_server.Conn) -> int:
        start = time.perf_counter()
        status, chunks = await conn.post("/v1/completions", body)
        assert status == 200, status
        ttfts.append(next(t for t, c in chunks if b"data: " in c) - start)
        # tokens from the usage chunk: an event may carry several tokens (the Ray replica
        # merges what queued up), and a proxy may split an event across HTTP chunks
        nonlocal events
        body_bytes = b"".join(c for _, c in chunks)
        events += body_bytes.count(b"data: {") - 1  # less the usage chunk
        at = body_bytes.rindex(b'"completion_tokens":') + len(b'"completion_tokens":')
        return int(body_bytes[at:at + 12].split(b",")[0].split(b"}")[0])

    tokens, secs = await bench_server._run_pool(url, concurrency, streams, one)
    return tokens, secs, ttfts, events


class RayApp:
    """The servekit application on a local Ray (one fake engine replica, one ingress)."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        from servekit.deploy.ray import load_settings

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
        port = bench_server.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        self.ready_s = self.deploy(load_settings(fake=True, replicas=1, replica_cpus=1.0,
                                                 ingress_cpus=1.0))

    def deploy(self, args: Any) -> float:
        """Deploy the application of ``args`` at ``/`` (replacing the last); seconds taken."""
        from ray import serve

        from servekit.deploy.ray import build_app

        started = time.perf_counter()
        serve.run(build_app(args), name=APP, route_prefix="/")
        return time.perf_counter() - started

    def served(self) -> dict[str, int]:
        """Requests served so far by each engine replica of the application."""
        import ray
        from ray.exceptions import RayError

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if f"::{APP}#EngineReplica#" in a["name"]]
        stats = []
        for name in names:  # Ray Serve's replica actor calls the deployment's method
            try:
                stats.append(ray.get(ray.get_actor(name, namespace="serve")
                                     .record_routing_stats.remote(), timeout=10))
            except (RayError, ValueError):  # still starting, or gone
                continue
        return {s["replica"]: int(s["requests"]) for s in stats}

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def routing_hit_rates(app: RayApp, quick: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Prefix hit rate of each router (and the oracle's) on the multi-tenant workload, and the
    share of the requests each router sent to its busiest replica."""
    from servekit.deploy.ray import load_settings

    tenants, per_tenant = (8, 6) if quick else (16, 12)
    work = [t for t in range(tenants) for _ in range(per_tenant)]
    random.Random(0).shuffle(work)
    rates = {"oracle": 1 - tenants / len(work)}
    busiest: dict[str, float] = {}
    for policy in ("cache_aware", "consistent_hash", "ray"):
        app.deploy(load_settings(fake=True, replicas=2, replica_cpus=0.5, ingress_cpus=0.5,
                                 routing_policy=policy, routing_stats_period=0.5))
        deadline = time.monotonic() + 60
        while len(app.served()) < 2:
            assert time.monotonic() < deadline, "replicas did not start"
            time.sleep(0.2)
        homes: dict[int, set[str]] = {}
        hits = 0
        start = app.served()
        with httpx.Client(base_url=app.url, timeout=30) as http:
            for i, tenant in enumerate(work):
                before = app.served()
                system = f"tenant {tenant} system prompt. " + "You answer briefly. " * 12
                r = http.post("/v1/completions", json={
                    "model": "fake", "prompt": system + f"question {i}?", "max_tokens": 2})
                assert r.status_code == 200, r.text
                after = app.served()
                replica = next(n for n in after if after[n] > before.get(n, 0))
                hits += replica in homes.setdefault(tenant, set())
                homes[tenant].add(replica)
        rates[policy] = hits / len(work)
        end = app.served()
        busiest[policy] = max(end[n] - start.get(n, 0) for n in end) / len(work)
    return rates, busiest


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds = args.rounds or (3 if args.quick else 5)
    concurrency, max_tokens, streams = (16, 500, 32) if args.quick else (32, 1000, 128)
    idle_n = 10 if args.quick else 30
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    replica = bench_server.ServerProcess("--fake")
    gateway = GatewayProcess(replica.url)
    ray_app = RayApp()
    targets = {"ray ingress": ray_app.url, "gateway": gateway.url, "direct": replica.url}
    tps: dict[str, list[float]] = {k: [] for k in targets}
    ttft: dict[str, list[float]] = {k: [] for k in targets}
    idle: dict[str, list[float]] = {k: [] for k in targets}
    per_event: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for url in targets.values():  # warm up
            asyncio.run(stream_with_ttft(url, 8, 50, 16))
        for _ in range(rounds):
            for name, url in targets.items():
                tokens, secs, ttfts, events = asyncio.run(stream_with_ttft(
                    url, concurrency, max_tokens, streams))
                assert tokens == streams * max_tokens, (name, tokens, streams * max_tokens)
                tps[name].append(tokens / secs)
                ttft[name] += ttfts
                per_event[name].append(tokens / events)
                _, _, one_at_a_time, _ = asyncio.run(stream_with_ttft(url, 1, 16, idle_n))
                idle[name] += one_at_a_time
        gateway.stop()
        replica.stop()
        hit_rates, busiest = routing_hit_rates(ray_app, args.quick)
    finally:
        ray_app.stop()
        gateway.stop()
        replica.stop()
    rows: list[dict[str, Any]] = []
    medians = {name: summary(vals)["median"] for name, vals in tps.items()}
    for name in targets:
        s = summary(tps[name])
        rows.append({"scenario": f"{name}: streamed tokens/s", "median": s["median"],
                     "min": s["min"], "max": s["max"]})
        for q in (0.5, 0.9):
            rows.append({"scenario": f"{name}: TTFT under load p{int(q * 100)}, ms",
                         "median": 1e3 * bench_server.pct(ttft[name], q)})
        rows.append({"scenario": f"{name}: tokens per SSE event",
                     "median": statistics.median(per_event[name])})
        rows.append({"scenario": f"{name}: TTFT one at a time, ms",
                     "median": 1e3 * statistics.median(idle[name]),
                     "min": 1e3 * min(idle[name]), "max": 1e3 * max(idle[name])})
    ray_vs_gw = medians["ray ingress"] / medians["gateway"]
    rows.append({"scenario": "ray ingress / gateway: streamed tokens/s", "median": ray_vs_gw})
    rows.append({"scenario": "ray ingress / direct: streamed tokens/s",
                 "median": medians["ray ingress"] / medians["direct"]})
    rows.append({"scenario": "gateway / direct: streamed tokens/s",
                 "median": medians["gateway"] / medians["direct"]})
    hop = statistics.median(idle["ray ingress"]) - statistics.median(idle["direct"])
    rows.append({"scenario": "Ray's hops, added TTFT one at a time, ms", "median": 1e3 * hop})
    rows.append({"scenario": "ray app deploy time, s", "median": ray_app.ready_s})
    for name, rate in hit_rates.items():
        label = {"cache_aware": "servekit cache_aware router",
                 "consistent_hash": "servekit consistent_hash router",
                 "ray": "Ray's default router", "oracle": "oracle"}[name]
        rows.append({"scenario": f"prefix hit rate: {label}", "median": rate})
        if name in busiest:
            rows.append({"scenario": f"busiest replica's share of requests: {label}",
                         "median": busiest[name]})
    bars = {"ray_streamed_tokens_vs_gateway": bar(ray_vs_gw, 0.5),
            "servekit_router_hit_rate_above_rays": bar(
                hit_rates["cache_aware"] - hit_rates["ray"], 1e-9),
            "servekit_router_hit_rate_vs_oracle": bar(
                hit_rates["cache_aware"] / hit_rates["oracle"], 0.9)}
    print_table(rows, ["scenario", "median", "min", "max"], title="servekit on Ray Serve")
    print_bars(bars)
    write_json(args.json, "ray", rows, bars,
               workload={"concurrency": concurrency, "max_tokens": max_tokens,
                         "streams": streams, "rounds": rounds, "one_at_a_time": idle_n})


if __name__ == "__main__":
    main()
