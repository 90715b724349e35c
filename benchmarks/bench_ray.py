"""Ray Serve benchmark: what Ray's hops cost. One instant fake replica served three ways, side
by side in one run, rounds interleaved: the Ray application (Ray's HTTP proxy -> the
``OpenAIIngress`` replica -> a Ray handle stream -> the ``EngineReplica``), ``servekit gateway``
in front of one ``servekit serve --fake``, and that ``servekit serve --fake`` directly.

For each: streamed tokens/s (streams of ``max_tokens`` tokens, ``concurrency`` at a time,
counted from each stream's usage chunk: the Ray replica merges the deltas that queued up while
the previous Ray item travelled, so its events may carry several tokens), TTFT under that load (p50, p90), and TTFT of one stream at a time
(the hops' latency). Ratios to the gateway and to direct. Bar: the Ray ingress keeps >= 0.5x the
gateway's streamed tokens/s. Not yet here: the routing-quality part (prefix hit rate with
servekit's router vs Ray's default power-of-two router).

    python benchmarks/bench_ray.py --quick --json benchmarks/results/ray-cpu-2026-12-06.json
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server
from _common import bar, parse_args, print_bars, print_table, summary, write_json
from bench_gateway import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent


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

        from servekit.deploy.ray import build_app, load_settings

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
        port = bench_server.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = load_settings(fake=True, replicas=1, ingress_replicas=1, replica_cpus=1.0,
                             ingress_cpus=1.0, routing_policy="cache_aware")
        started = time.perf_counter()
        serve.run(build_app(args), name="servekit-bench", route_prefix="/")
        self.ready_s = time.perf_counter() - started
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


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
    bars = {"ray_streamed_tokens_vs_gateway": bar(ray_vs_gw, 0.5)}
    print_table(rows, ["scenario", "median", "min", "max"], title="servekit on Ray Serve")
    print_bars(bars)
    write_json(args.json, "ray", rows, bars,
               workload={"concurrency": concurrency, "max_tokens": max_tokens,
                         "streams": streams, "rounds": rounds, "one_at_a_time": idle_n})


if __name__ == "__main__":
    main()
