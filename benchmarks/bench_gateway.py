"""Gateway benchmark, part 1 (overhead): streamed tokens/s and requests/s straight to one fake
replica vs through ``servekit gateway`` in front of it, side by side in one run.

Bar: the gateway keeps >= 0.5 of direct streamed tokens/s, also with failover on (the gateway
secret set: the replica sends token ids, the gateway tracks and strips them). Not yet here:
nginx as a plain proxy, and part 2 (routing quality: cache-aware vs round-robin vs consistent-hash vs oracle).

    python benchmarks/bench_gateway.py --quick --json benchmarks/results/gateway-cpu.json
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server
from _common import bar, parse_args, print_bars, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess(bench_server.ServerProcess):
    """``servekit gateway --replica URL`` in a subprocess."""

    def __init__(self, replica: str, secret: str | None = None) -> None:
        self.port = bench_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "servekit.server.cli", "gateway", "--port", str(self.port),
               "--replica", replica, "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if k != "SERVEKIT_GATEWAY_SECRET"}
        if secret is not None:  # the replica sends token ids: streams can fail over
            env["SERVEKIT_GATEWAY_SECRET"] = secret
        self.started = bench_server.time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.ready_s = self._wait_ready()


def _measure(url: str, rounds: int, quick: bool) -> tuple[list[float], list[float]]:
    concurrency, max_tokens, streams = 32, 1000, 64 if quick else 256
    asyncio.run(bench_server.stream_tokens(url, 8, 50, 16))  # warm up
    tps, rps = [], []
    for _ in range(rounds):
        tokens, secs = asyncio.run(bench_server.stream_tokens(url, concurrency, max_tokens,
                                                              streams))
        assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
        tps.append(tokens / secs)
        n, secs = asyncio.run(bench_server.short_requests(url, 32, 300 if quick else 1000))
        rps.append(n / secs)
    return tps, rps


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds = args.rounds or (3 if args.quick else 5)
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ["SERVEKIT_GATEWAY_SECRET"] = secret = os.urandom(8).hex()
    replica = bench_server.ServerProcess("--fake")
    gateway = GatewayProcess(replica.url)
    failover = GatewayProcess(replica.url, secret)
    rows: list[dict[str, Any]] = []
    medians: dict[str, dict[str, float]] = {}
    try:
        for name, url in (("direct", replica.url), ("gateway", gateway.url),
                          ("gateway+failover", failover.url)):
            tps, rps = _measure(url, rounds, args.quick)
            medians[name] = {"tps": summary(tps)["median"], "rps": summary(rps)["median"]}
            for what, vals in (("streamed tokens/s", tps), ("requests/s", rps)):
                s = summary(vals)
                rows.append({"scenario": f"{name}: {what}", "median": s["median"],
                             "min": s["min"], "max": s["max"]})
    finally:
        gateway.stop()
        failover.stop()
        replica.stop()
    bars = {}
    for name, key in (("gateway", "gateway"), ("gateway+failover", "gateway_failover")):
        ratio_tps = medians[name]["tps"] / medians["direct"]["tps"]
        ratio_rps = medians[name]["rps"] / medians["direct"]["rps"]
        rows.append({"scenario": f"{name} / direct: streamed tokens/s", "median": ratio_tps})
        rows.append({"scenario": f"{name} / direct: requests/s", "median": ratio_rps})
        bars[f"{key}_streamed_tokens_vs_direct"] = bar(ratio_tps, 0.5)
    print_table(rows, ["scenario", "median", "min", "max"], title="servekit gateway overhead")
    print_bars(bars)
    write_json(args.json, "gateway", rows, bars)


if __name__ == "__main__":
    main()
