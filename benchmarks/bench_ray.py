"""Ray Serve benchmark: what Ray's hops cost. One instant fake replica served three ways, side
by side in one run, rounds interleaved: the Ray application (Ray's HTTP proxy -> the
``OpenAIIngress`` replica -> a Ray handle stream -> the ``EngineReplica``), ``servekit gateway``
in front of one ``servekit serve --fake``, and that ``servekit serve --fake`` directly.

For each: streamed tokens/s (streams of ``max_tokens`` tokens, ``concurrency`` at a time,
counted from each stream's usage chunk: the Ray replica merges the deltas that queued up while
the previous Ray item travelled, so its events may carry several tokens), TTFT under that load (p50, p90), and TTFT of one stream at a time
(the hops' latency). Ratios to the gateway and to direct. Bar: the Ray ingress keeps >= 0.5x the
gateway's streamed tokens/s.

Routing quality: the gateway benchmark's multi-tenant workload (``bench_gateway.py``: tenants
with long shared system prompts, multi-turn sessions, replayed closed-loop, 12 at a time) on three
replicas that run the real scheduler and prefix cache over the cost-model fake model
(``engine.fake_model_cost``, ``servekit serve --fake-model-cost``: real KV events), the same
trace and replicas three ways in one run: Ray with servekit's cache-aware router (KV index from
the held blocks the replicas report every ``routing_stats_period``), Ray with Ray Serve's
default router (``routing_policy = "ray"``: power of two choices on queue length), and
``servekit gateway --policy cache_aware`` in front of three ``servekit serve
--fake-model-cost``. Hit rate: the replicas' prefix-cache hits over lookups (prompt tokens).
Bars: servekit's router in Ray within 5 points of the gateway's cache-aware rate, and above
Ray's default router's.

    python benchmarks/bench_ray.py --quick --json benchmarks/results/ray-cpu-2026-12-06.json
    python benchmarks/bench_ray.py --quick --part routing   # one part only
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server
from _common import bar, parse_args, print_bars, print_table, summary, write_json
from _routing_workload import replay, sessions
from bench_gateway import BLOCKS, COST, REPLAY, GatewayProcess, run_policy, workload
from servekit.deploy.ray import load_settings

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
    """A local Ray with Serve started; :meth:`deploy` (re)places the servekit application."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        started = time.perf_counter()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
        port = bench_server.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        self.ready_s = time.perf_counter() - started

    def deploy(self, args: Any) -> float:
        """Deploy the application of ``args`` at ``/`` (replacing the last); seconds taken."""
        from ray import serve

        from servekit.deploy.ray import build_app

        started = time.perf_counter()
        serve.run(build_app(args), name=APP, route_prefix="/")
        return time.perf_counter() - started

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Each engine replica's routing stats (load, requests served, prefix-cache counters)."""
        import ray
        from ray.exceptions import RayError

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if f"::{APP}#EngineReplica#" in a["name"]]
        stats = {}
        for name in names:  # Ray Serve's replica actor calls the deployment's method
            try:
                one = ray.get(ray.get_actor(name, namespace="serve")
                              .record_routing_stats.remote(), timeout=10)
            except (RayError, ValueError):  # still starting, or gone
                continue
            stats[one["replica"]] = one
        return stats

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


#: Ray's routing-stats period in the routing runs (the gateway probes its replicas every 0.2 s
#: and reads their KV events as they come).
STATS_PERIOD = 0.2


def ray_routing(app: RayApp, policy: str, round_no: int, work: dict[str, Any]
                ) -> dict[str, Any]:
    """One replay of the trace through the Ray application on three cost-model replicas with
    ``policy`` (a servekit routing policy, or ``"ray"``)."""
    app.deploy(load_settings(fake_model_cost=json.dumps({**COST, "num_blocks": BLOCKS}),
                             replicas=3, replica_cpus=0.5, ingress_cpus=1.0,
                             routing_policy=policy, routing_stats_period=STATS_PERIOD))
    deadline = time.monotonic() + 60
    while len(before := app.replica_stats()) < 3:
        assert time.monotonic() < deadline, "replicas did not start"
        time.sleep(0.2)
    trace = sessions(nonce=f"ray-{policy}-{round_no}-{os.urandom(4).hex()}", seed=round_no,
                     **work)
    t0 = time.perf_counter()
    results = asyncio.run(replay(app.url, trace, **REPLAY))
    wall = time.perf_counter() - t0
    after = app.replica_stats()
    assert set(after) == set(before), "a replica restarted during the replay"
    delta = {k: [after[r][k] - before[r][k] for r in after]
             for k in ("prefix_hits", "prefix_queries", "requests")}
    per_replica = delta["requests"]
    mean = sum(per_replica) / len(per_replica)
    ttft = [r["ttft"] for r in results]
    return {"hit_rate": sum(delta["prefix_hits"]) / sum(delta["prefix_queries"]),
            "ttft_p50_ms": 1e3 * bench_server.pct(ttft, 0.5),
            "ttft_p99_ms": 1e3 * bench_server.pct(ttft, 0.99),
            "max_over_mean": max(per_replica) / mean if mean else float("nan"),
            "requests": len(results), "wall_s": wall}


#: The routing runs: (row label, how).
ROUTING_RUNS = (("ray + servekit cache_aware router", "cache_aware"),
                ("ray + Ray's default router (power of two)", "ray"),
                ("servekit gateway, cache_aware", "gateway"))


def routing_quality(app: RayApp, quick: bool, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Each of :data:`ROUTING_RUNS` on the same trace (per round), rounds interleaved."""
    fleet: list[bench_server.ServerProcess] = []
    os.environ["SERVEKIT_GATEWAY_SECRET"] = secret = os.urandom(8).hex()  # after ray.init
    try:
        fleet = [bench_server.ServerProcess("--fake-model-cost", json.dumps(
            {**COST, "num_blocks": BLOCKS})) for _ in range(3)]
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_no in range(rounds):
            for label, how in ROUTING_RUNS:
                if how == "gateway":
                    result = run_policy(label, "cache_aware", [p.url for p in fleet], secret,
                                        round_no, workload(quick), REPLAY)
                else:
                    result = ray_routing(app, how, round_no, workload(quick))
                runs.setdefault(label, []).append(result)
    finally:
        for proc in fleet:
            proc.stop()
        os.environ.pop("SERVEKIT_GATEWAY_SECRET", None)
    return runs


def bench_overhead(ray_app: RayApp, quick: bool, rounds: int
                   ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Streamed tokens/s and TTFT: the Ray ingress vs the gateway vs direct, rounds interleaved."""
    concurrency, max_tokens, streams = (16, 500, 32) if quick else (32, 1000, 128)
    idle_n = 10 if quick else 30
    ray_app.deploy(load_settings(fake=True, replicas=1, replica_cpus=1.0, ingress_cpus=1.0))
    replica = bench_server.ServerProcess("--fake")
    gateway = GatewayProcess(replica.url)
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
    finally:
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
    bars = {"ray_streamed_tokens_vs_gateway": bar(ray_vs_gw, 0.5)}
    return rows, bars, {"concurrency": concurrency, "max_tokens": max_tokens,
                        "streams": streams, "rounds": rounds, "one_at_a_time": idle_n}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--part", choices=("overhead", "routing", "all"), default="all"))
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # replicas share two cores
    ray_app = RayApp()
    rows: list[dict[str, Any]] = [{"scenario": "ray start + serve.start, s",
                                   "median": ray_app.ready_s}]
    bars: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        if args.part in ("overhead", "all"):
            o_rows, o_bars, extra["workload"] = bench_overhead(
                ray_app, args.quick, args.rounds or (3 if args.quick else 5))
            rows += o_rows
            bars.update(o_bars)
        if args.part in ("routing", "all"):
            runs = routing_quality(ray_app, args.quick, args.rounds or (1 if args.quick else 3))
    finally:
        ray_app.stop()
    print_table(rows, ["scenario", "median", "min", "max"], title="servekit on Ray Serve")
    if args.part in ("routing", "all"):
        r_rows, med = [], {}
        for label, results in runs.items():
            med[label] = {k: summary([r[k] for r in results])["median"]
                          for k in ("hit_rate", "ttft_p50_ms", "ttft_p99_ms", "max_over_mean")}
            r_rows.append({"router": label, **med[label], "requests": results[0]["requests"],
                           "wall_s": summary([r["wall_s"] for r in results])["median"]})
        print_table(r_rows, ["router", "hit_rate", "ttft_p50_ms", "ttft_p99_ms",
                             "max_over_mean", "requests", "wall_s"],
                    title="routing quality (3 cost-model replicas, the gateway benchmark's "
                          "multi-tenant trace)")
        rows += r_rows
        servekit_ray, ray_default, gateway = (med[label]["hit_rate"]
                                              for label, _ in ROUTING_RUNS)
        bars["ray_servekit_router_hit_rate_within_5_points_of_gateway"] = bar(
            servekit_ray - gateway, -0.05)
        bars["ray_servekit_router_hit_rate_above_rays_default"] = bar(
            servekit_ray - ray_default, 1e-9)
        extra["routing"] = {"cost": COST, "blocks_per_replica": BLOCKS,
                            "workload": workload(args.quick), "replay": REPLAY,
                            "ray_routing_stats_period": STATS_PERIOD}
    print_bars(bars)
    write_json(args.json, "ray", rows, bars, **extra)


if __name__ == "__main__":
    main()
