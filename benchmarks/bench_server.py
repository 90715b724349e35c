"""HTTP server benchmark: the reference server in its own process, the client in this one.

1. Fake model (``servekit serve --fake``): streamed tokens/s over SSE (32 streams x 1,000
   tokens, one event per token, this file's :func:`stream_tokens` client) beside a bare uvicorn
   ASGI endpoint streaming the identical chunks (``_bare_peers.py``), rounds interleaved, at
   three pacings, each side making as many tokens per pass of the event loop as the other: one
   (a stepping engine's consumer: one wake-up per token), ``STEP_TOKENS``, and a whole
   completion (instant; the bare peer then writes as fast as the transport takes the bytes).
   Per pacing the ratio to the issue's peer, one message per event (bar: >= 0.5x), and, where
   a pass holds several events, to a stricter floor that writes them in one message as
   servekit does; each server's CPU microseconds per token; servekit at one token per pass
   against the instant peer (the issue's first, mixed comparison); requests/s of short
   non-streamed completions. The same over gRPC beside it
   (``bench_grpc.grpc_rows``: GenerateStream, Session, unary, and a bare ``grpc.aio`` server
   streaming the same messages), with ratios.
2. Coalescing: slow readers (every event takes 20 ms to send) on the demo model in this
   process, with and without merging the deltas a stream fell behind on: events per token and
   time to the last token.
3. The demo model (``servekit serve``, the real engine): time until ``/ready`` and peak RSS
   (bars: < 10 s, < 1 GB), then TTFT and inter-token latency percentiles under Poisson arrivals
   at three rates, plotted into ``benchmarks/results/``.
4. ``--engine-process`` (only this part): the demo model under 64 concurrent streams, the
   engine in the server's process vs in an engine-core process of its own
   (``servekit serve --engine-process``) and with two front-end processes sharing that core
   (``--api-processes 2``), all servers up at once, rounds interleaved: output tokens/s,
   client-side inter-token latency p50/p99, and the CPU all of a server's processes used.

    python benchmarks/bench_server.py --quick --json benchmarks/results/server-cpu-2026-12-06.json
    python benchmarks/bench_server.py --quick --engine-process \
        --json benchmarks/results/server-engine-process-cpu-2026-12-06.json
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bare_peers import PeerProcess
from _common import (
    bar,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# -- server process ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``servekit serve ...`` in a subprocess; records the time until /ready and peak RSS."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "servekit.server.cli", "serve", "--port", str(self.port),
               "--log-level", "warning", *args]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- clients -------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client on asyncio streams: httpx's pool, not the server, is the
# bottleneck at tens of concurrent connections. Each SSE event leaves the server as one HTTP
# chunk, so chunks are events and their arrival times are the client-side token times.

class Conn:
    """One keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> tuple[int, list[tuple[float, bytes]]]:
        """POST JSON (with extra ``headers``); returns the status and (arrival time, data) per
        body chunk."""
        data = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                          b"%scontent-length: %d\r\n\r\n%s" % (path.encode(), extra, len(data),
                                                                 data))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        chunks: list[tuple[float, bytes]] = []
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                payload = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append((time.perf_counter(), payload[:-2]))
        else:
            i = lower.index(b"content-length:") + 15
            length = int(lower[i:lower.index(b"\r\n", i)])
            chunks.append((time.perf_counter(), await self.reader.readexactly(length)))
        return status, chunks

    def close(self) -> None:
        self.writer.close()


async def _run_pool(url: str, concurrency: int, n: int,
                    request: Callable[[Conn], Awaitable[int]]) -> tuple[int, float]:
    """Run ``request`` ``n`` times over ``concurrency`` connections; (sum of its counts, seconds)."""
    conns = [await Conn.open(url) for _ in range(concurrency)]
    left, total = n, 0

    async def worker(conn: Conn) -> None:
        nonlocal left, total
        while left > 0:
            left -= 1
            count = await request(conn)  # awaited first: `total +=` would read a stale total
            total += count

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    secs = time.perf_counter() - start
    for c in conns:
        c.close()
    return total, secs


async def stream_tokens(url: str, concurrency: int, max_tokens: int, streams: int) -> tuple[int, float]:
    """Run ``streams`` streamed completions, ``concurrency`` at a time; (tokens, seconds)."""
    body = {"model": "fake", "prompt": "hello", "max_tokens": max_tokens, "stream": True}

    async def one(conn: Conn) -> int:
        status, chunks = await conn.post("/v1/completions", body)
        assert status == 200, status
        # joined first: a proxy (nginx) may split an event across chunks
        return b"".join(c for _, c in chunks).count(b"data: {")

    return await _run_pool(url, concurrency, streams, one)


async def short_requests(url: str, concurrency: int, requests: int) -> tuple[int, float]:
    """``requests`` non-streamed 8-token completions, ``concurrency`` at a time."""
    body = {"model": "fake", "prompt": "hello", "max_tokens": 8}

    async def one(conn: Conn) -> int:
        status, _ = await conn.post("/v1/completions", body)
        assert status == 200, status
        return 1

    return await _run_pool(url, concurrency, requests, one)


async def poisson_load(url: str, model: str, rate: float, n: int, max_tokens: int, seed: int
                       ) -> list[dict[str, Any]]:
    """``n`` streamed completions arriving as a Poisson process of ``rate``/s; per request the
    client-side TTFT and the gaps between tokens."""
    rng = random.Random(seed)
    prompts = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "HAMLET:"]
    results: list[dict[str, Any]] = []

    async def one(prompt: str) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0.8, "ignore_eos": True}
        conn = await Conn.open(url)
        t0 = time.perf_counter()
        status, chunks = await conn.post("/v1/completions", body)
        conn.close()
        assert status == 200, (status, chunks)
        stamps = [t for t, c in chunks if c.startswith(b"data: {")]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        results.append({"ttft": stamps[0] - t0, "gaps": gaps})

    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(one(rng.choice(prompts))))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- scenarios -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_stream(url: str, pid: int, concurrency: int, max_tokens: int, streams: int
                 ) -> tuple[float, float]:
    """One round of :func:`stream_tokens`: (tokens/s, server CPU microseconds per token)."""
    cpu0 = cpu_seconds(pid)
    tokens, secs = asyncio.run(stream_tokens(url, concurrency, max_tokens, streams))
    assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
    return tokens / secs, 1e6 * (cpu_seconds(pid) - cpu0) / tokens


#: Tokens the fake makes per pass of the event loop in the middle pacing (docs/server.md).
STEP_TOKENS = 16


def bench_fake(quick: bool, rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``servekit serve --fake`` beside bare uvicorn SSE peers at three pacings, each side
    making the same tokens per pass of the event loop (1, ``STEP_TOKENS``, a whole completion),
    rounds interleaved: the issue's peer (one message per event; the bar) and, where a pass
    holds several events, a stricter floor writing them in one message as servekit does. Also
    servekit at one token per pass against the issue's instant peer (mixed pacing), and
    requests/s of short non-streamed completions."""
    concurrency, max_tokens = 32, 1000
    streams = 64 if quick else 256
    pacings = {  # name: (the fake's tokens per pass, the peer, the joined floor)
        "1 tok per loop pass": (1, "sse-step", None),
        f"{STEP_TOKENS} tok per loop pass": (STEP_TOKENS, f"sse-step{STEP_TOKENS}",
                                             f"sse-step{STEP_TOKENS}-joined"),
        "instant (whole completion per pass)": (max_tokens, "sse", "sse-joined"),
    }
    one, *_, instant = pacings
    procs: dict[str, Any] = {}  # "<pacing>/<side>": the process
    samples: dict[str, list[float]] = {"mixed": [], "rps": []}

    def measure(key: str) -> float:
        proc = procs[key]
        tps, cpu = timed_stream(proc.url, proc.proc.pid, concurrency, max_tokens, streams)
        samples.setdefault(f"{key}/tps", []).append(tps)
        samples.setdefault(f"{key}/cpu", []).append(cpu)
        return tps

    try:
        for name, (per_pass, peer, joined) in pacings.items():
            procs[f"{name}/servekit"] = ServerProcess("--fake", "--fake-tokens-per-yield",
                                                      str(per_pass))
            procs[f"{name}/peer"] = PeerProcess(peer)
            if joined:
                procs[f"{name}/joined"] = PeerProcess(joined)
        for proc in procs.values():
            asyncio.run(stream_tokens(proc.url, 8, 50, 16))  # warm up
        for _ in range(rounds):
            for name in pacings:
                tps = measure(f"{name}/servekit")
                for side in ("peer", "joined"):
                    if f"{name}/{side}" in procs:
                        samples.setdefault(f"{name}/{side}/ratio", []).append(
                            tps / measure(f"{name}/{side}"))
            samples["mixed"].append(samples[f"{one}/servekit/tps"][-1]
                                    / samples[f"{instant}/peer/tps"][-1])
        server = procs[f"{one}/servekit"]
        for _ in range(rounds):
            n, secs = asyncio.run(short_requests(server.url, 32, 500 if quick else 2000))
            samples["rps"].append(n / secs)
    finally:
        for proc in procs.values():
            proc.stop()
    rows: list[dict[str, Any]] = []
    bars: dict[str, Any] = {}
    setting = f"{concurrency} streams x {max_tokens} tok, 1 event/tok"
    sides = {"servekit": "servekit --fake", "peer": "bare uvicorn SSE (1 message/event)",
             "joined": "bare uvicorn SSE (1 message/pass)"}

    def row(scenario: str, key: str, row_setting: str) -> None:
        rows.append({"scenario": scenario, "setting": row_setting, **summary(samples[key])})

    for name in pacings:
        for side, label in sides.items():
            if f"{name}/{side}" not in procs:
                continue
            row(f"{label}, {name}: streamed tokens/s", f"{name}/{side}/tps", setting)
            row(f"{label}, {name}: server CPU us/token", f"{name}/{side}/cpu",
                "server process user+sys")
            if side != "servekit":
                row(f"ratio servekit / {label}, {name}", f"{name}/{side}/ratio",
                    "per round, paired")
        slug = name.split(" (")[0].replace(" ", "_")
        bars[f"server_streamed_tokens_per_s_vs_bare_uvicorn_{slug}"] = bar(
            summary(samples[f"{name}/peer/ratio"])["median"], 0.5)
    row(f"ratio servekit {one} / {sides['peer']} instant (mixed pacing)", "mixed",
        "per round, paired")
    row("fake: requests/s", "rps", "32 clients, 8 tok, no stream")
    return rows, bars


def bench_demo(quick: bool, model: str | None) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                        dict[str, Any]]:
    args = ["--model", model] if model else []
    server = ServerProcess(*args)
    served = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    try:
        rows.append({"scenario": "demo: start to /ready (s)", "setting": model or "demo model",
                     "median": server.ready_s, "min": server.ready_s, "max": server.ready_s})
        rates = (1.0, 4.0, 8.0) if quick else (2.0, 8.0, 16.0)
        n = 12 if quick else 60
        max_tokens = 32 if quick else 64
        for rate in rates:
            res = asyncio.run(poisson_load(server.url, served, rate, n, max_tokens, seed=int(rate)))
            ttft = [r["ttft"] for r in res]
            gaps = [g for r in res for g in r["gaps"]]
            curves[str(rate)] = {"ttft": ttft, "itl": gaps}
            for metric, values in (("TTFT (ms)", ttft), ("ITL (ms)", gaps)):
                rows.append({"scenario": f"demo: {metric} @ {rate:g} req/s",
                             "setting": f"{n} req x {max_tokens} tok",
                             "median": 1e3 * pct(values, 0.5), "min": 1e3 * min(values),
                             "max": 1e3 * max(values), "p90": 1e3 * pct(values, 0.9),
                             "p99": 1e3 * pct(values, 0.99)})
        rss = server.peak_rss_mb()
    finally:
        server.stop()
    rows.append({"scenario": "demo: peak RSS (MB)", "setting": "after the load",
                 "median": rss, "min": rss, "max": rss})
    bars = {"demo_start_seconds": bar(server.ready_s, 10.0, higher_is_better=False),
            "demo_peak_rss_mb": bar(rss, 1024.0, higher_is_better=False)}
    return rows, bars, curves


async def _slow_reader_run(coalesce: bool, streams: int, max_tokens: int, read_s: float
                           ) -> tuple[float, float]:
    """``streams`` demo-model streams whose every event takes ``read_s`` to send (a client
    draining slowly behind flow control); (events per token, seconds to the last token)."""
    from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
    from servekit.engine.outputs import RequestOutput
    from servekit.sched.params import SamplingParams
    from servekit.server.cli import DEMO_MODEL
    from servekit.server.service import GenerationService, Job

    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(
        num_blocks=512, max_num_seqs=streams, max_num_batched_tokens=2048)))
    engine.coalesces_outputs = coalesce  # type: ignore[misc]  # what the service asks for
    service = GenerationService(engine)
    service.state.set_ready()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = engine.tokenizer.encode("ROMEO:")
    events = tokens = 0
    last = 0.0

    async def one(n: int) -> None:
        nonlocal events, tokens, last
        job = Job(f"slow-{n}", "demo", None, [prompt], [(0, params)])
        await service.admit(job)

        async def on_output(i: int, out: RequestOutput) -> None:
            nonlocal events, tokens, last
            events += 1
            tokens += len(out.new_token_ids)
            await asyncio.sleep(read_s)
            last = time.perf_counter()

        await service.run(job, on_output)

    async with engine:
        start = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(streams)))
    assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
    return events / tokens, last - start


def bench_coalescing(quick: bool, rounds: int) -> list[dict[str, Any]]:
    """Slow readers on the demo model, with and without merging the deltas they fell behind."""
    streams, max_tokens, read_s = (8, 48, 0.02) if quick else (16, 128, 0.02)
    samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(rounds):
        for coalesce in (True, False):
            samples[coalesce].append(asyncio.run(_slow_reader_run(coalesce, streams, max_tokens,
                                                                  read_s)))
    setting = f"{streams} streams x {max_tokens} tok, {1e3 * read_s:g} ms/event reader"
    rows = []
    for coalesce, name in ((True, "coalesced"), (False, "one event per delta")):
        rows.append({"scenario": f"slow reader, {name}: events per token", "setting": setting,
                     **summary([e for e, _ in samples[coalesce]])})
        rows.append({"scenario": f"slow reader, {name}: time to last token (s)",
                     "setting": setting, **summary([t for _, t in samples[coalesce]])})
    return rows


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def concurrent_streams(url: str, model: str, streams: int, max_tokens: int
                             ) -> tuple[int, float, list[float]]:
    """``streams`` streamed completions at once, each exactly ``max_tokens`` long; (tokens,
    seconds, gaps between the events of each stream)."""
    prompts = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "HAMLET:"]
    conns = [await Conn.open(url) for _ in range(streams)]

    async def one(i: int, conn: Conn) -> list[float]:
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "stream": True, "temperature": 0.8, "seed": i, "ignore_eos": True}
        status, chunks = await conn.post("/v1/completions", body)
        assert status == 200 and chunks[-1][1].endswith(b"data: [DONE]\n\n"), (status, chunks[-1])
        stamps = [t for t, c in chunks if c.startswith(b"data: {")]
        return [b - a for a, b in itertools.pairwise(stamps)]

    start = time.perf_counter()
    gaps = await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    secs = time.perf_counter() - start
    for c in conns:
        c.close()
    return streams * max_tokens, secs, [g for per in gaps for g in per]


def bench_engine_process(quick: bool, rounds: int, model: str | None) -> list[dict[str, Any]]:
    """The demo model at 64 concurrent streams: engine in process vs in its own process."""
    args = ["--model", model] if model else []
    servers = {"engine in process": ServerProcess(*args),
               "engine core in its own process": ServerProcess(*args, "--engine-process"),
               "2 front-end processes, one engine core": ServerProcess(*args,
                                                                       "--api-processes", "2")}
    for server in servers.values():  # every front end ready (a new connection may hit any)
        deadline = time.perf_counter() + 120
        while sum(httpx.get(server.url + "/ready").status_code == 200 for _ in range(20)) < 20:
            assert time.perf_counter() < deadline, "front ends not ready"
            time.sleep(0.2)
    streams, max_tokens = 64, (64 if quick else 128)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"tps": [], "p50": [], "p99": [], "cpu": []} for name in servers}
    try:
        served = httpx.get(next(iter(servers.values())).url + "/v1/models").json()["data"][0]["id"]
        for server in servers.values():  # warm up
            asyncio.run(concurrent_streams(server.url, served, 8, 8))
        for _ in range(rounds):
            for name, server in servers.items():
                pids = [server.proc.pid, *_children(server.proc.pid)]
                cpu0 = sum(map(cpu_seconds, pids))
                tokens, secs, gaps = asyncio.run(
                    concurrent_streams(server.url, served, streams, max_tokens))
                cpu = sum(map(cpu_seconds, pids)) - cpu0
                got = samples[name]
                got["tps"].append(tokens / secs)
                got["p50"].append(1e3 * pct(gaps, 0.5))
                got["p99"].append(1e3 * pct(gaps, 0.99))
                got["cpu"].append(1e3 * cpu / tokens)
    finally:
        for server in servers.values():
            server.stop()
    setting = f"{streams} streams x {max_tokens} tok"
    rows = []
    for name, got in samples.items():
        for key, label in (("tps", "output tokens/s"), ("p50", "ITL p50 (ms)"),
                           ("p99", "ITL p99 (ms)"),
                           ("cpu", "server CPU ms per token (all its processes)")):
            rows.append({"scenario": f"demo, {name}: {label}", "setting": setting,
                         **summary(got[key])})
    local, split, shared = samples.values()
    for name, other in (("own process", split), ("2 front ends", shared)):
        rows.append({"scenario": f"demo: tokens/s, {name} / in process (paired rounds)",
                     "setting": setting, **summary(
                         [b / a for a, b in zip(local["tps"], other["tps"], strict=True)])})
    return rows


def plot(curves: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "itl"), strict=True):
        for rate, data in curves.items():
            values = sorted(1e3 * v for v in data[metric])
            ax.plot(values, [i / len(values) for i in range(1, len(values) + 1)],
                    label=f"{float(rate):g} req/s")
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests" if metric == "ttft" else "fraction of gaps")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("servekit serve, demo model, Poisson arrivals (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--model", default=None, help="model dir for part 2 (default: demo)"),
        p.add_argument("--skip-demo", action="store_true", help="only the fake-model part"),
        p.add_argument("--skip-grpc", action="store_true", help="no gRPC rows"),
        p.add_argument("--skip-coalescing", action="store_true", help="no slow-reader rows"),
        p.add_argument("--engine-process", action="store_true",
                       help="only part 4: engine in process vs in its own process")))
    rounds = args.rounds or (3 if args.quick else 5)
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    if args.engine_process:
        rows = bench_engine_process(args.quick, rounds, args.model)
        print_table(rows, ["scenario", "setting", "median", "min", "max"],
                    title="servekit serve: the engine core in its own process (demo model)")
        write_json(args.json, "server-engine-process", rows, {})
        return
    rows, bars = bench_fake(args.quick, rounds)
    if not args.skip_grpc:  # the same fake model over gRPC, its server in its own process
        import bench_grpc

        grpc_rows, grpc_bars = bench_grpc.grpc_rows(args.quick, rounds)
        rows += grpc_rows + bench_grpc.ratio_rows(grpc_rows, rows)
        bars.update(grpc_bars)
    if not args.skip_coalescing:  # in this process: the engine and the service, no HTTP
        rows += bench_coalescing(args.quick, rounds)
    curves: dict[str, Any] = {}
    if not args.skip_demo:
        demo_rows, demo_bars, curves = bench_demo(args.quick, args.model)
        rows += demo_rows
        bars.update(demo_bars)
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(curves, RESULTS / "server-latency-cpu.png")
    print_table(rows, ["scenario", "setting", "median", "min", "max", "p90", "p99"],
                title="servekit HTTP server")
    print_bars(bars)
    write_json(args.json, "server", rows, bars, latency_samples_ms={
        rate: {k: [round(1e3 * v, 3) for v in vals] for k, vals in data.items()}
        for rate, data in curves.items()})


if __name__ == "__main__":
    main()
