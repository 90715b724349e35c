"""Limiter benchmark: servekit.limit vs `limits` (3 strategies, memory and Redis) and aiolimiter.

Scenarios (same process, one after the other, several rounds, medians with min-max):
- checks/s: one key saturated (10/s), one key never limited, 100k keys round-robin;
- async acquire/s on a never-limited key (vs aiolimiter);
- accuracy: a greedy client at 100/s (capacity 100) for 3 s (1 s with --quick): admitted vs
  the exact bucket bound floor(C + r * span) (the bar: 1.00x) and vs r * T;
- Redis decisions/s (RPM+TPM in one EVALSHA) vs limits' Redis storage and a bare PING;
- memory for 100k keys: servekit with two limits vs limits' fixed window with one.

The checks/s measurement is :mod:`servekit.bench.limiter` (``python -m servekit.bench limiter
--store URL`` runs it on a store plugin beside the memory store).
"""

from __future__ import annotations

import asyncio
import gc
import math
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiolimiter
import limits
from limits import parse, strategies
from limits.storage import MemoryStorage, RedisStorage

import _common as C
from servekit.bench.limiter import BIG, compare_checks, store_checker
from servekit.limit import Limit, Limiter, RedisStore

STRATEGIES = {
    "limits fixed": strategies.FixedWindowRateLimiter,
    "limits moving": strategies.MovingWindowRateLimiter,
    "limits sliding": strategies.SlidingWindowCounterRateLimiter,
}


def limits_checker(name: str, per_second: int, storage: Any = None) -> Callable[[str], bool]:
    limiter = STRATEGIES[name](storage or MemoryStorage())
    item = parse(f"{per_second}/second")
    hit = limiter.hit
    return lambda key: hit(item, key)


def checks(args: Any, rounds: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    n = 20_000 if args.quick else 200_000
    makers: dict[str, Callable[[float], Callable[[str], bool]]] = {
        "servekit": lambda r: store_checker(r, r),
        "servekit rpm+tpm": lambda r: store_checker(r, r, two=True),
        **{name: (lambda r, nm=name: limits_checker(nm, int(r))) for name in STRATEGIES},
    }
    rows, best = [], {}
    for scen, samples in compare_checks(makers, n=n, rounds=rounds).items():
        for name, s in samples.items():
            row = {"scenario": scen, "impl": name, **{f"checks/s {k}": v
                                                       for k, v in C.summary(s).items()}}
            rows.append(row)
        med = {name: C.summary(s)["median"] for name, s in samples.items()}
        best_limits = max(med[name] for name in STRATEGIES)
        best[scen] = med["servekit"] / best_limits
        for row in rows[-len(samples):]:
            row["vs best limits"] = row["checks/s median"] / best_limits
    return rows, best


def async_acquire(args: Any, rounds: int) -> tuple[list[dict[str, Any]], float]:
    n = 20_000 if args.quick else 100_000
    ours = Limiter([Limit("r", BIG, BIG)])

    async def run_ours() -> float:
        start = time.perf_counter()
        for _ in range(n):
            await ours.acquire("k")
        return n / (time.perf_counter() - start)

    async def run_theirs() -> float:
        theirs = aiolimiter.AsyncLimiter(BIG, 1)  # one per event loop, as aiolimiter asks
        start = time.perf_counter()
        for _ in range(n):
            await theirs.acquire()
        return n / (time.perf_counter() - start)

    s_ours, s_theirs = [], []
    for _ in range(rounds):
        s_ours.append(asyncio.run(run_ours()))
        s_theirs.append(asyncio.run(run_theirs()))
    rows = [{"impl": "servekit acquire", **C.summary(s_ours)},
            {"impl": "aiolimiter acquire", **C.summary(s_theirs)}]
    return rows, C.summary(s_ours)["median"] / C.summary(s_theirs)["median"]


def accuracy(args: Any) -> tuple[list[dict[str, Any]], float]:
    """A greedy client (checks as fast as it can) against 100/s for T seconds.

    The buckets (servekit, aiolimiter: capacity C = 100) admit at most ``floor(C + r * span)``,
    span running from the client's first check to its last, and an exact one admits exactly
    that: the bar is admitted / bound = 1.00 for servekit with C = 100 (it reads the client's
    own clock, so its bound is exact; aiolimiter's may be one token off at the edges).
    ``admitted / rT`` compares with the window limiters (100 per window: promise r * T).
    servekit with C = 1 reaches 1 + r * span only if the client is never descheduled for more
    than 1/r: a one-token bucket cannot bank the rest.
    """
    duration, rate, capacity = (1.0 if args.quick else 3.0), 100, 100
    clock = [0.0]  # servekit reads the loop's own time: its bound is then exact

    def greedy(check: Callable[[], bool]) -> tuple[int, float]:
        admitted, first = 0, time.monotonic()
        last, end = first, first + duration
        while (now := time.monotonic()) < end:
            clock[0] = last = now
            admitted += check()
        return admitted, last - first

    results: dict[str, tuple[int, float]] = {}
    burst = Limiter([Limit.per_second("r", rate)], clock=lambda: clock[0])  # 100/s, burst 100
    results["servekit (C=100)"] = greedy(lambda: burst.try_acquire("k").allowed)
    pacer = Limiter([Limit("r", 1, rate)], clock=lambda: clock[0])  # 100/s, no burst
    results["servekit (C=1)"] = greedy(lambda: pacer.try_acquire("k").allowed)
    for name in STRATEGIES:
        check = limits_checker(name, rate)
        results[name] = greedy(lambda c=check: c("k"))
    leaky = aiolimiter.AsyncLimiter(rate, 1)

    async def aio() -> tuple[int, float]:
        admitted, first = 0, time.monotonic()
        last, end = first, first + duration
        while (now := time.monotonic()) < end:
            last = now
            if leaky.has_capacity():
                await leaky.acquire()
                admitted += 1
            else:
                await asyncio.sleep(0)
        return admitted, last - first

    results["aiolimiter (C=100)"] = asyncio.run(aio())
    rows = []
    for impl, (admitted, span) in results.items():
        row: dict[str, Any] = {"impl": impl, "admitted": admitted, "span s": span}
        if "C=" in impl:  # a window limiter has no such bound: see admitted / rT
            cap = 1 if "C=1)" in impl else capacity
            bound = math.floor(cap + rate * span + 1e-9)
            row.update({"bucket bound C+r*span": bound, "admitted / bound": admitted / bound})
        row.update({"rT": rate * duration, "admitted / rT": admitted / (rate * duration)})
        rows.append(row)
    return rows, rows[0]["admitted / bound"]


class _Redis:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is required (apt-get install redis-server)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def redis_rates(args: Any, rounds: int) -> tuple[list[dict[str, Any]], tuple[float, float, float]]:
    server = _Redis()
    url = f"redis://127.0.0.1:{server.port}"
    # many short interleaved rounds: on a shared machine load spikes outlast long ones
    n, rounds = (1_000 if args.quick else 5_000), rounds * 4
    try:
        store = RedisStore(url, timeout=2.0)
        two = Limiter([Limit.per_minute("rpm", BIG), Limit.per_minute("tpm", BIG)], store=store)
        costs = {"rpm": 1, "tpm": 500}
        raw = server.client.connection_pool.get_connection()  # the floor: PING on a socket
        sock = raw._sock

        def raw_ping() -> None:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            if sock.recv(64) != b"+PONG\r\n":
                raise RuntimeError("bad PING reply")

        makers: dict[str, Callable[[], Any]] = {
            "redis PING (redis-py)": lambda: store.client.ping,
            "redis PING (raw socket)": lambda: raw_ping,
            "servekit rpm+tpm": lambda: (lambda: two.try_acquire("k", costs)),
        }
        for name in STRATEGIES:
            check = limits_checker(name, BIG, RedisStorage(url))
            makers[name] = lambda c=check, k=f"k-{name}": (lambda: c(k))
        fns = {name: make() for name, make in makers.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append(n / (time.perf_counter() - start))
        med = {name: C.summary(s)["median"] for name, s in samples.items()}
        rows = [{"impl": name, **{f"decisions/s {k}": v for k, v in C.summary(s).items()},
                 "vs PING": med[name] / med["redis PING (redis-py)"],
                 "vs raw PING": med[name] / med["redis PING (raw socket)"]}
                for name, s in samples.items()]
        best_limits = max(med[name] for name in STRATEGIES)
        ours = med["servekit rpm+tpm"]
        return rows, (ours / med["redis PING (redis-py)"], ours / med["redis PING (raw socket)"],
                      ours / best_limits)
    finally:
        server.stop()


def memory() -> tuple[list[dict[str, Any]], float]:
    keys = [f"user-{i}" for i in range(100_000)]

    def measure(fill: Callable[[], Any]) -> float:
        gc.collect()
        tracemalloc.start()
        keep = fill()
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del keep
        return used / 2**20

    def ours() -> Any:
        limiter = Limiter([Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 10_000)])
        for key in keys:
            limiter.try_acquire(key, {"rpm": 1, "tpm": 100})
        return limiter

    def theirs() -> Any:
        limiter = strategies.FixedWindowRateLimiter(MemoryStorage())
        item = parse("100/minute")
        for key in keys:
            limiter.hit(item, key)
        return limiter

    ours_mib, theirs_mib = measure(ours), measure(theirs)
    rows = [{"impl": "servekit, 2 limits", "MiB for 100k keys": ours_mib},
            {"impl": "limits fixed, 1 limit", "MiB for 100k keys": theirs_mib}]
    return rows, ours_mib / theirs_mib


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    rounds = args.rounds or (3 if args.quick else 7)
    check_rows, check_ratio = checks(args, rounds)
    C.print_table(check_rows, ["scenario", "impl", "checks/s median", "checks/s min",
                               "checks/s max", "vs best limits"], "in-memory checks/s")
    acq_rows, acq_ratio = async_acquire(args, rounds)
    C.print_table(acq_rows, ["impl", "median", "min", "max"], "async acquire/s (never limited)")
    acc_rows, acc = accuracy(args)
    C.print_table(acc_rows, ["impl", "admitted", "span s", "bucket bound C+r*span",
                             "admitted / bound", "rT", "admitted / rT"],
                  "greedy client at 100/s, capacity 100 (bar: admitted / bound = 1.00)")
    red_rows, (vs_ping, vs_raw_ping, vs_limits_redis) = redis_rates(args, rounds)
    C.print_table(red_rows, ["impl", "decisions/s median", "decisions/s min", "decisions/s max",
                             "vs PING", "vs raw PING"], "Redis, one connection")
    mem_rows, mem_ratio = memory()
    C.print_table(mem_rows, ["impl", "MiB for 100k keys"], "memory (tracemalloc)")
    bars = {
        "checks_vs_best_limits_min_over_scenarios": C.bar(min(check_ratio.values()), 2.0),
        "acquire_vs_aiolimiter": C.bar(acq_ratio, 1.0),
        "accuracy_admitted_vs_bucket_bound": {"value": acc, "target": 1.0,
                                              "holds": 0.99 <= acc <= 1.0},
        "redis_vs_ping": C.bar(vs_ping, 0.9),
        "redis_vs_best_limits_redis": C.bar(vs_limits_redis, 1.0),
        "memory_vs_limits_fixed": C.bar(mem_ratio, 1.0, higher_is_better=False),
    }
    C.print_bars(bars)
    print(f"  (not a bar) redis vs a PING on a raw socket, the floor: {C.fmt(vs_raw_ping)}")
    C.write_json(args.json, "limiter", check_rows + acq_rows + acc_rows + red_rows + mem_rows,
                 bars, per_scenario_vs_best_limits=check_ratio, redis_vs_raw_socket_ping=vs_raw_ping, limits_version=limits.__version__,
                 aiolimiter_version=getattr(aiolimiter, "__version__", "?"))


if __name__ == "__main__":
    main()
