"""Simulator speed: simulated seconds per CPU second, and the time of a fleet plan.

1. One Llama-3-8B/H100 replica (roofline step times, max_num_seqs 256, 2,048-token budget) on
   the ``chat`` preset near saturation: simulated seconds per CPU second (bar >= 50x real
   time), measured with ``time.process_time`` over several rounds; one extra round runs under
   cProfile and prints where the time goes (scheduler, KV manager, the simulator itself).
2. ``servekit plan`` for 1e9 tokens/min of Llama-3-8B on H100 with the ``chat`` preset,
   TTFT p99 1 s, ITL p99 50 ms: wall seconds (bar < 300 s). ``--quick`` plans a smaller search
   (one configuration, 20 s trials) and reports it without the bar.

Both bars are ratios to real time on this machine, so they carry its noise: the machine is
shared; the table prints medians with min-max.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from _common import bar, parse_args, print_bars, print_table, write_json
from servekit.sim import ReplicaConfig, Scenario, simulate
from servekit.sim.planner import plan_capacity
from servekit.sim.scenario import fleet_sizes
from servekit.sim.specs import device_spec, model_spec
from servekit.sim.steptime import RooflineModel
from servekit.sim.workload import workload_from_dict

MODEL, DEVICE = model_spec("llama-3-8b"), device_spec("h100")


def saturated_scenario(rate: float, duration: float, seed: int = 0) -> Scenario:
    """One replica on the chat preset at ``rate`` requests/s."""
    step = RooflineModel(MODEL, DEVICE)
    rc = ReplicaConfig(count=1, max_num_seqs=256, max_num_batched_tokens=2048)
    blocks, max_len = fleet_sizes(rc, MODEL, step)
    wl = workload_from_dict({"preset": "chat", "rate": rate})
    return Scenario(wl, step, blocks, max_len, rc, duration=duration, seed=seed,
                    vocab_size=MODEL.vocab_size, sample_interval=5.0)


def speed_row(rate: float, duration: float, rounds: int) -> dict[str, Any]:
    speeds, result = [], None
    for i in range(rounds):
        t0 = time.process_time()
        result = simulate(saturated_scenario(rate, duration, seed=i))
        speeds.append(result.sim_time / (time.process_time() - t0))
    assert result is not None
    running = result.timeline.running
    return {"case": f"1 replica, chat, {rate:g} req/s", "sim_s_per_cpu_s": statistics.median(speeds),
            "min": min(speeds), "max": max(speeds), "sim_seconds": result.sim_time,
            "mean_running": sum(running) / max(1, len(running)),
            "out_tok_per_s": result.throughput["output_tokens_per_s"],
            "ttft_p50": result.all.ttft.p50}


def where_time_goes(rate: float, duration: float) -> dict[str, float]:
    """Share of CPU (tottime) by part, from one profiled run."""
    prof = cProfile.Profile()
    prof.enable()
    simulate(saturated_scenario(rate, duration))
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.items():
        if "servekit/sched" in filename:
            part = "sched"
        elif "servekit/kv" in filename:
            part = "kv"
        elif "servekit/sim" in filename:
            part = "sim"
        elif "servekit/route" in filename or "servekit/limit" in filename:
            part = "route+limit"
        else:
            part = "other (numpy, heapq, builtins)"
        parts[part] = parts.get(part, 0.0) + tottime
    total = sum(parts.values())
    return {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def _extra(parser: Any) -> None:
    parser.add_argument("--validate", action="store_true",
                        help="compare with the real server on the demo model instead")
    parser.add_argument("--validate-duration", type=float, default=40.0)
    parser.add_argument("--plot", type=Path, default=None)


def main() -> None:
    args = parse_args(__doc__ or "", _extra)
    if args.validate:
        rows = validate(args.validate_duration, args.plot)
        print_table(rows, ["load", "source", "rate", "ttft_p50", "ttft_p90", "itl_p50",
                           "out_tok_per_s", "goodput_rps", "requests"], "server vs simulator")
        write_json(args.json, "sim_validation", rows, {})
        return
    quick = args.quick
    rounds = args.rounds or (2 if quick else 3)
    duration = 60.0 if quick else 300.0
    rate = 22.0  # ~90 % of this configuration's saturation (about 24 req/s)
    rows = [speed_row(rate, duration, rounds)]
    print_table(rows, ["case", "sim_s_per_cpu_s", "min", "max", "sim_seconds", "mean_running",
                       "out_tok_per_s", "ttft_p50"], "simulated seconds per CPU second")
    shares = where_time_goes(rate, 30.0 if quick else 60.0)
    print("\nwhere the time goes (share of CPU)")
    for part, share in shares.items():
        print(f"  {part:<32}{share:6.1%}")
    t0 = time.perf_counter()
    wl = workload_from_dict({"preset": "chat", "rate": 1.0})
    if quick:
        plan = plan_capacity(MODEL, DEVICE, wl, tokens_per_minute=1e9, ttft_p99=1.0,
                             itl_p99=0.05, tp_options=(1,), max_num_seqs_options=(256,),
                             token_budget_options=(512,), duration=20.0, warmup=5.0)
    else:
        plan = plan_capacity(MODEL, DEVICE, wl, tokens_per_minute=1e9, ttft_p99=1.0,
                             itl_p99=0.05)
    plan_s = time.perf_counter() - t0
    print("\n" + plan.format())
    plan_row = {"case": "plan 1e9 tok/min llama-3-8b h100 chat" + (" (quick)" if quick else ""),
                "seconds": plan_s, "replicas": plan.replicas, "gpus": plan.gpus,
                "simulations": plan.simulations}
    rows.append(plan_row)
    bars = {"sim_speed_x_real_time": bar(rows[0]["sim_s_per_cpu_s"], 50.0)}
    if not quick:
        bars["plan_1e9_seconds"] = bar(plan_s, 300.0, higher_is_better=False)
    print_bars(bars)
    write_json(args.json, "sim", rows, bars, cpu_shares=shares, plan=plan.to_dict())


# --------------------------------------------------------------------------- validation

VALIDATE_SEQS, VALIDATE_BUDGET, PROMPT, OUTPUT = 16, 256, 64, 32


async def _load(port: int, rate: float, duration: float, vocab: int, seed: int) -> dict[str, Any]:
    """Open-loop Poisson load on a running ``servekit serve``; TTFT, ITL and throughput."""
    import asyncio
    import json

    import httpx
    import numpy as np

    rng = np.random.default_rng(seed)
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    good = 0

    async def one(client: httpx.AsyncClient, at: float) -> None:
        nonlocal tokens, good
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        body = {"model": "servekit-demo", "prompt": rng.integers(0, vocab, PROMPT).tolist(),
                "max_tokens": OUTPUT, "ignore_eos": True, "stream": True, "temperature": 0.0}
        t0 = loop.time()
        times: list[float] = []
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                                 json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        times.append(loop.time())
        if times:
            ttfts.append(times[0] - t0)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            itls.extend(gaps)
            tokens += len(times)
            if times[0] - t0 <= 1.0 and (not gaps or sum(gaps) / len(gaps) <= 0.2):
                good += 1

    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, float(a)) for a in arrivals))
    return {"ttft_p50": float(np.percentile(ttfts, 50)), "ttft_p90": float(np.percentile(ttfts, 90)),
            "itl_p50": float(np.percentile(itls, 50)), "out_tok_per_s": tokens / duration,
            "goodput_rps": good / duration, "requests": len(arrivals)}


def _sim_row(profile: Any, rate: float, duration: float, seed: int) -> dict[str, Any]:
    from servekit.sim import SLO

    meta = profile.meta
    rc = ReplicaConfig(count=1, max_num_seqs=VALIDATE_SEQS, max_num_batched_tokens=VALIDATE_BUDGET,
                       num_blocks=meta["num_blocks"])
    wl = workload_from_dict({"rate": rate, "prompt": PROMPT, "output": OUTPUT})
    sc = Scenario(wl, profile, meta["num_blocks"], meta["max_model_len"], rc, slo=SLO(1.0, 0.2),
                  duration=duration, seed=seed, vocab_size=meta["vocab_size"])
    r = simulate(sc)
    return {"ttft_p50": r.all.ttft.p50, "ttft_p90": r.all.ttft.p90, "itl_p50": r.all.itl.p50,
            "out_tok_per_s": r.throughput["output_tokens_per_s"], "goodput_rps": r.all.goodput,
            "requests": len(r.records)}


def validate(duration: float, png: Path | None) -> list[dict[str, Any]]:
    """Profile the demo engine, then the same Poisson workloads through ``servekit serve`` and
    the simulator at three loads (fractions of the simulated capacity)."""
    import asyncio
    import socket
    import subprocess

    import httpx

    from servekit.sim.profile import profile_engine

    profile = profile_engine(max_num_seqs=VALIDATE_SEQS, max_num_batched_tokens=VALIDATE_BUDGET,
                             steps=300)
    print(f"profile: r2 {profile.meta['r2']:.3f}, median step {profile.meta['median_step'] * 1e3:.1f} ms")
    capacity = _sim_row(profile, 50.0, 20.0, 0)["out_tok_per_s"] / OUTPUT  # saturated req/s
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "servekit.server.cli", "serve", "--port", str(port),
         "--max-num-seqs", str(VALIDATE_SEQS), "--max-num-batched-tokens", str(VALIDATE_BUDGET),
         "--log-level", "warning"])
    rows = []
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        vocab = profile.meta["vocab_size"]
        for name, frac in (("light", 0.3), ("near saturation", 0.85), ("overloaded", 1.5)):
            rate = capacity * frac
            real = asyncio.run(_load(port, rate, duration, vocab, 1))
            sim = _sim_row(profile, rate, duration, 1)
            for source, row in (("server", real), ("sim", sim)):
                rows.append({"load": name, "rate": rate, "source": source, **row})
            print(f"{name}: server {real}\n{' ' * len(name)}  sim    {sim}")
    finally:
        server.terminate()
        server.wait(30)
    if png is not None:
        _plot_validation(rows, png)
    return rows


def _plot_validation(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["ttft_p50", "ttft_p90", "itl_p50", "out_tok_per_s"]
    loads = list(dict.fromkeys(r["load"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 3.5))
    for ax, m in zip(axes, metrics, strict=True):
        for i, source in enumerate(("server", "sim")):
            vals = [next(r[m] for r in rows if r["load"] == ld and r["source"] == source)
                    for ld in loads]
            ax.bar([j + 0.4 * i for j in range(len(loads))], vals, 0.4, label=source)
        ax.set_xticks([j + 0.2 for j in range(len(loads))], loads, fontsize=7)
        ax.set_title(m)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
