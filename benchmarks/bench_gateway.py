"""Gateway benchmark: the relay's overhead, and the quality of its routing.

1. Overhead: streamed tokens/s and requests/s straight to one fake replica vs through
   ``servekit gateway`` in front of it, side by side in one run. Bar: the gateway keeps >= 0.5
   of direct streamed tokens/s, also with failover on (the gateway secret set: the replica
   sends token ids, the gateway tracks and strips them). Debian's nginx as a plain reverse
   proxy in front of the same replica, in the same run, is the reference; for each proxy also
   streamed tokens per CPU-second of the proxy process (two cores are shared by client, proxy
   and replica).
2. Routing quality: three replicas that run the real scheduler and prefix cache over a fake
   model whose step time grows with the uncached prompt tokens (``servekit serve
   --fake-model-cost``), a multi-tenant workload with shared system prompts and multi-turn
   sessions (``_routing_workload.py``), replayed through a gateway per policy: cache-aware,
   round-robin, consistent-hash on the session id, and the oracle (the same trace on one
   replica holding the three's KV blocks together). Per policy: the replicas' prefix-cache hit
   rate (their /metrics), client TTFT p50/p99, max/mean of requests per replica. Bars:
   cache-aware reaches >= 0.9 of the oracle's hit rate with max/mean <= 1.25, and its TTFT
   p50 beats round-robin's. TTFT distributions are plotted into ``benchmarks/results/``. A
   smaller run on three demo-model replicas (the real model, CPU) compares cache-aware and
   round-robin on a real model: system prompts that fill most of the 256-token context, the
   replicas warmed up by a throwaway replay first, the two policies in ABBA order (a fresh
   replica's first requests pay torch's first-call costs: whichever policy ran first lost).

    python benchmarks/bench_gateway.py --quick --json benchmarks/results/gateway-cpu.json
    python benchmarks/bench_gateway.py --quick --part routing   # one part only
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server
from _common import bar, parse_args, print_bars, print_table, stop_process, summary, write_json
from _routing_workload import replay, sessions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class GatewayProcess(bench_server.ServerProcess):
    """``servekit gateway --replica URL`` in a subprocess."""

    def __init__(self, replica: str | Sequence[str], secret: str | None = None,
                 *extra: str) -> None:
        self.port = bench_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        replicas = [replica] if isinstance(replica, str) else list(replica)
        cmd = [sys.executable, "-m", "servekit.server.cli", "gateway", "--port", str(self.port),
               *(a for r in replicas for a in ("--replica", r)), "--log-level", "warning",
               *extra]
        env = {k: v for k, v in os.environ.items() if k != "SERVEKIT_GATEWAY_SECRET"}
        if secret is not None:  # the replica sends token ids: streams can fail over
            env["SERVEKIT_GATEWAY_SECRET"] = secret
        self.started = bench_server.time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.ready_s = self._wait_ready()


_NGINX_CONF = """
daemon off;
worker_processes 1;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream replica {{ server {upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class NginxProcess:
    """Debian's nginx as a plain reverse proxy (one worker, keep-alive upstream connections,
    no buffering so SSE events pass as they come), run in the foreground by this user with a
    temporary config, pid file and error log."""

    def __init__(self, replica: str) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise FileNotFoundError("nginx is not installed (apt-get install -y nginx)")
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-nginx-")
        tmp = self._tmp.name
        self.port = bench_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # as root, the workers would switch to nobody, who cannot use the temp directory
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(user=user, tmp=tmp, port=self.port,
                                           upstream=replica.removeprefix("http://")))
        self.proc = subprocess.Popen([binary, "-p", tmp, "-c", str(conf), "-e",
                                      f"{tmp}/error.log"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(Path(tmp) / 'error.log').read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("nginx not answering")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self._tmp.cleanup()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (nginx's master and worker)."""
    total = bench_server.cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # it just exited
                total += bench_server.cpu_seconds(int(child))
    return total


def _measure_round(url: str, quick: bool, proxy_pid: int | None
                   ) -> tuple[float, float, float | None]:
    """One round: streamed tokens/s, requests/s and (with a proxy) streamed tokens per proxy
    CPU-second."""
    concurrency, max_tokens, streams = 32, 1000, 64 if quick else 256
    cpu0 = tree_cpu_seconds(proxy_pid) if proxy_pid is not None else 0.0
    tokens, secs = asyncio.run(bench_server.stream_tokens(url, concurrency, max_tokens, streams))
    assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
    per_cpu = None
    if proxy_pid is not None:
        per_cpu = tokens / max(1e-9, tree_cpu_seconds(proxy_pid) - cpu0)
    n, rsecs = asyncio.run(bench_server.short_requests(url, 32, 300 if quick else 1000))
    return tokens / secs, n / rsecs, per_cpu


def bench_overhead(quick: bool, rounds: int, secret: str
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Part 1: direct vs through the gateway (without and with failover)."""
    replica = bench_server.ServerProcess("--fake")
    gateway = GatewayProcess(replica.url)
    failover = GatewayProcess(replica.url, secret)
    try:
        nginx: NginxProcess | None = NginxProcess(replica.url)
    except FileNotFoundError as exc:  # the row is left out, the rest still runs
        print(f"no nginx row: {exc}")
        nginx = None
    targets = [("direct", replica.url, None), ("gateway", gateway.url, gateway.proc.pid),
               ("gateway+failover", failover.url, failover.proc.pid)]
    if nginx is not None:
        targets.insert(1, ("nginx", nginx.url, nginx.proc.pid))
    rows: list[dict[str, Any]] = []
    medians: dict[str, dict[str, float]] = {}
    samples: dict[str, list[tuple[float, float, float | None]]] = {t[0]: [] for t in targets}
    try:
        for _, url, _ in targets:  # warm up
            asyncio.run(bench_server.stream_tokens(url, 8, 50, 16))
        for _ in range(rounds):  # rounds interleaved: a busy spell hits every row alike
            for name, url, pid in targets:
                samples[name].append(_measure_round(url, quick, pid))
        for name, got in samples.items():
            tps, rps = [g[0] for g in got], [g[1] for g in got]
            per_cpu = [g[2] for g in got if g[2] is not None]
            medians[name] = {"tps": summary(tps)["median"], "rps": summary(rps)["median"]}
            for what, vals in (("streamed tokens/s", tps), ("requests/s", rps),
                               ("streamed tokens per proxy CPU-second", per_cpu)):
                if vals:
                    s = summary(vals)
                    rows.append({"scenario": f"{name}: {what}", "median": s["median"],
                                 "min": s["min"], "max": s["max"]})
    finally:
        if nginx is not None:
            nginx.stop()
        gateway.stop()
        failover.stop()
        replica.stop()
    bars = {}
    for name, _, _ in targets[1:]:
        ratio_tps = medians[name]["tps"] / medians["direct"]["tps"]
        ratio_rps = medians[name]["rps"] / medians["direct"]["rps"]
        rows.append({"scenario": f"{name} / direct: streamed tokens/s", "median": ratio_tps})
        rows.append({"scenario": f"{name} / direct: requests/s", "median": ratio_rps})
        if name != "nginx":  # nginx's row is the reference, not held to a bar
            key = name.replace("+", "_")
            bars[f"{key}_streamed_tokens_vs_direct"] = bar(ratio_tps, 0.5)
    if nginx is not None:
        for what, key in (("streamed tokens/s", "tps"), ("requests/s", "rps")):
            ratio = medians["gateway"][key] / medians["nginx"][key]
            rows.append({"scenario": f"gateway / nginx: {what}", "median": ratio})
    return rows, bars


# -- part 2: routing quality -----------------------------------------------------------------

#: The fake model's step cost (servekit.engine.cost_runner), about a 13B model on one GPU:
#: 8 ms per step, 60 us per uncached prompt token (a 2,000-token prompt prefills in 120 ms),
#: 0.2 ms per decoding sequence. The oracle is one replica with the three's KV blocks and
#: their compute together (every cost a third).
COST = {"base_s": 0.008, "prefill_token_s": 6e-5, "decode_row_s": 2e-4}
#: KV blocks (16 tokens) per replica: about a third of the workload's working set.
BLOCKS = 640
POLICIES = (("cache-aware", "cache_aware"), ("round-robin", "round_robin"),
            ("consistent-hash", "consistent_hash"))


def workload(quick: bool) -> dict[str, Any]:
    return {"tenants": 8, "system_bytes": 1500, "n": 48 if quick else 144, "turns": 5,
            "message_bytes": 150}


def _counters(url: str) -> tuple[float, float]:
    """A replica's prefix-cache ``(hits, queries)``, prompt tokens, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {m[1]: float(m[2]) for m in re.finditer(
        r"^servekit_prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)$", text, re.M)}
    return found.get("hits", 0.0), found.get("queries", 0.0)


def _routed(gateway_url: str) -> dict[str, float]:
    """Requests the gateway routed to each replica (its routing-decision counters)."""
    text = httpx.get(gateway_url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for m in re.finditer(r'^servekit_gateway_routing_decisions_total\{([^}]*)\} (\S+)$',
                         text, re.M):
        replica = re.search(r'replica="([^"]*)"', m[1])
        if replica is not None:
            counts[replica[1]] = counts.get(replica[1], 0.0) + float(m[2])
    return counts


#: How the trace is replayed on the cost-model replicas.
REPLAY = {"concurrency": 12, "max_tokens": 16, "think_s": 0.05, "stagger_s": 0.1}
#: The smaller confirming run on demo-model replicas (context 256 tokens, ~1.8 bytes a token:
#: the system prompts take ~170 of them, so their prefill is what a cache hit saves).
DEMO_WORKLOAD = {"tenants": 12, "system_bytes": 300, "n": 48, "turns": 2, "message_bytes": 12}
DEMO_REPLAY = {"concurrency": 3, "max_tokens": 4, "think_s": 0.05, "stagger_s": 0.1,
               "model": "servekit-demo"}
DEMO_KV_MB = 2  # 63 blocks of 16 tokens per replica (32 KiB each)
#: The same on a long-context model: ~1,000-token system prompts; TTFT is the one token's event.
LONG_WORKLOAD = {"tenants": 12, "system_bytes": 1800, "n": 36, "turns": 2, "message_bytes": 40}
LONG_REPLAY = {**DEMO_REPLAY, "max_tokens": 1, "model": "long-context"}
LONG_KV_MB = 48  # 245 blocks of 16 tokens per replica (192 KiB each): ~4 system prompts
LONG_CONFIG = {"max_position_embeddings": 2048, "hidden_size": 384, "intermediate_size": 1024,
               "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
               "head_dim": 64}


def long_context_model(path: Path) -> Path:
    """A Llama with :data:`LONG_CONFIG` over the demo model's config and tokenizer, seeded
    weights, saved to ``path`` (no hub download; the engine loads it like any model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from servekit.server.cli import DEMO_MODEL

    config = json.loads((DEMO_MODEL / "config.json").read_text())
    for name in ("architectures", "transformers_version"):
        config.pop(name, None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**config, **LONG_CONFIG}))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        shutil.copy(DEMO_MODEL / name, path / name)
    return path


def run_policy(name: str, policy: str, replicas: list[str], secret: str, round_no: int,
                workload: dict[str, Any], how: dict[str, Any]) -> dict[str, Any]:
    """One replay of the trace through a fresh gateway with ``policy`` in front of ``replicas``."""
    gateway = GatewayProcess(replicas, secret, "--policy", policy, "--probe-interval", "0.2")
    try:
        time.sleep(1.0)  # the gateway reads each replica's info before its first request
        before = [_counters(u) for u in replicas]
        trace = sessions(nonce=f"{name}-{round_no}-{os.urandom(4).hex()}", seed=round_no,
                         **workload)
        t0 = time.perf_counter()
        results = asyncio.run(replay(gateway.url, trace, **how))
        wall = time.perf_counter() - t0
        after = [_counters(u) for u in replicas]
        routed = _routed(gateway.url)
    finally:
        gateway.stop()
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    per_replica = [routed.get(u, 0.0) for u in replicas]
    mean = sum(per_replica) / len(per_replica)
    ttft = [r["ttft"] for r in results]
    return {"policy": name, "hit_rate": hits / queries, "ttft": ttft,
            "uncached_tokens": queries - hits,
            "ttft_p50_ms": 1e3 * bench_server.pct(ttft, 0.5),
            "ttft_p99_ms": 1e3 * bench_server.pct(ttft, 0.99),
            "max_over_mean": max(per_replica) / mean if mean else float("nan"),
            "per_replica": per_replica, "requests": len(results), "wall_s": wall}


def bench_routing(quick: bool, rounds: int, secret: str
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list[float]]]:
    """Part 2: cache-aware vs round-robin vs consistent-hash vs the oracle."""
    fleet = [bench_server.ServerProcess("--fake-model-cost", json.dumps(
        {**COST, "num_blocks": BLOCKS})) for _ in range(3)]
    oracle = bench_server.ServerProcess("--fake-model-cost", json.dumps(
        {**{k: v / 3 for k, v in COST.items()}, "num_blocks": 3 * BLOCKS}))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for round_no in range(rounds):
            for name, policy in POLICIES:
                runs.setdefault(name, []).append(run_policy(
                    name, policy, [r.url for r in fleet], secret, round_no, workload(quick),
                    REPLAY))
            runs.setdefault("oracle", []).append(run_policy(
                "oracle", "cache_aware", [oracle.url], secret, round_no, workload(quick),
                REPLAY))
    finally:
        for proc in (*fleet, oracle):
            proc.stop()
    rows, med = [], {}
    for name, results in runs.items():
        med[name] = {k: summary([r[k] for r in results])["median"]
                     for k in ("hit_rate", "uncached_tokens", "ttft_p50_ms", "ttft_p99_ms",
                               "max_over_mean")}
        rows.append({"policy": name, **med[name], "requests": results[0]["requests"],
                     "wall_s": summary([r["wall_s"] for r in results])["median"],
                     "per_replica": results[-1]["per_replica"]})
    ca, rr, oracle_rate = med["cache-aware"], med["round-robin"], med["oracle"]["hit_rate"]
    bars = {"cache_aware_hit_rate_vs_oracle": bar(ca["hit_rate"] / oracle_rate, 0.9),
            "cache_aware_max_over_mean_requests": bar(ca["max_over_mean"], 1.25,
                                                      higher_is_better=False),
            "cache_aware_ttft_p50_vs_round_robin": bar(ca["ttft_p50_ms"] / rr["ttft_p50_ms"],
                                                       1.0, higher_is_better=False)}
    ttfts = {name: [t for r in results for t in r["ttft"]] for name, results in runs.items()}
    return rows, bars, ttfts


def bench_routing_demo(secret: str, *, label: str = "demo model", args: Sequence[str] = (),
                       workload: dict[str, Any] = DEMO_WORKLOAD,
                       how: dict[str, Any] = DEMO_REPLAY, kv_mb: int = DEMO_KV_MB
                       ) -> list[dict[str, Any]]:
    """The smaller run on three real-model replicas (the real engine and model, CPU; the demo
    model unless ``args`` name another): cache-aware vs round-robin, to confirm the TTFT
    ordering on a real model. A throwaway replay warms the replicas; the policies then run in
    ABBA order; medians of the two."""
    fleet = [bench_server.ServerProcess(*args, "--kv-cache-mb", str(kv_mb)) for _ in range(3)]
    urls = [p.url for p in fleet]
    policies = POLICIES[:2]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in policies}
    try:
        run_policy("warm-up", policies[1][1], urls, secret, 99, workload, how)
        for round_no, order in enumerate((policies, policies[::-1])):
            for name, policy in order:
                print(f"{label}: {name}, round {round_no + 1}/2", flush=True)
                runs[name].append(run_policy(name, policy, urls, secret, round_no, workload,
                                             how))
    finally:
        for proc in fleet:
            proc.stop()
    keys = ("hit_rate", "uncached_tokens", "ttft_p50_ms", "ttft_p99_ms", "max_over_mean",
            "wall_s")
    return [{"policy": f"{label}: {name}",
             **{k: summary([r[k] for r in results])["median"] for k in keys},
             "requests": sum(r["requests"] for r in results)}
            for name, results in runs.items()]


def plot_ttft(ttfts: dict[str, list[float]], path: Path) -> None:
    """TTFT CDFs per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in ttfts.items():
        ms = sorted(1e3 * v for v in values)
        label = "oracle (1 replica, 3x KV and speed)" if name == "oracle" else name
        ax.plot(ms, [i / len(ms) for i in range(1, len(ms) + 1)], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("gateway routing: 3 cost-model replicas, multi-turn multi-tenant trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--part", choices=("overhead", "routing", "all"), default="all"))
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # replicas share two cores
    os.environ["SERVEKIT_GATEWAY_SECRET"] = secret = os.urandom(8).hex()
    rows: list[dict[str, Any]] = []
    bars: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if args.part in ("overhead", "all"):
        o_rows, o_bars = bench_overhead(args.quick, args.rounds or (3 if args.quick else 5),
                                        secret)
        print_table(o_rows, ["scenario", "median", "min", "max"],
                    title="servekit gateway overhead")
        rows += o_rows
        bars.update(o_bars)
    if args.part in ("routing", "all"):
        r_rows, r_bars, ttfts = bench_routing(args.quick, args.rounds or (1 if args.quick else 3),
                                              secret)
        print_table(r_rows, ["policy", "hit_rate", "uncached_tokens", "ttft_p50_ms", "ttft_p99_ms",
                             "max_over_mean", "requests", "wall_s"],
                    title="routing quality (3 cost-model replicas; oracle: one with 3x KV and speed)")
        demo_rows = bench_routing_demo(secret)
        with tempfile.TemporaryDirectory(prefix="servekit-long-") as tmp:
            model = long_context_model(Path(tmp))
            demo_rows += bench_routing_demo(
                secret, label="2k-context model", args=("--model", str(model),
                                                        "--served-model-name", "long-context"),
                workload=LONG_WORKLOAD, how=LONG_REPLAY, kv_mb=LONG_KV_MB)
        print_table(demo_rows, ["policy", "hit_rate", "uncached_tokens", "ttft_p50_ms",
                                "ttft_p99_ms", "max_over_mean", "requests", "wall_s"],
                    title="confirming runs: 3 real-model replicas (demo model; 2k-context "
                          "Llama with seeded weights), CPU")
        rows += r_rows + demo_rows
        bars.update(r_bars)
        extra["routing"] = {"cost": COST, "blocks_per_replica": BLOCKS,
                            "workload": workload(args.quick), "replay": REPLAY,
                            "demo": {"workload": DEMO_WORKLOAD, "replay": DEMO_REPLAY,
                                     "kv_cache_mb": DEMO_KV_MB},
                            "long_context": {"workload": LONG_WORKLOAD, "replay": LONG_REPLAY,
                                             "kv_cache_mb": LONG_KV_MB, "config": LONG_CONFIG}}
        plot_ttft(ttfts, RESULTS / "gateway-routing-ttft.png")
    print_bars(bars)
    write_json(args.json, "gateway", rows, bars, **extra)


if __name__ == "__main__":
    main()
