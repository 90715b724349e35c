"""Usage ledger: records/s from the outbox into PostgreSQL and ClickHouse (chDB), and the server CPU time recording adds per request.

Sinks: N records are appended to an outbox, then one SinkWorker drains them in batches of
1,000 into a real PostgreSQL (started here from Debian's binaries, as the tests do) and into
chDB; records/s is the drain rate. Server: ``servekit serve --fake`` in a subprocess, 32
clients streaming 16 tokens for 32-token prompts; two servers run side by side, one with
``--usage none`` and one with the default SQLite ledger, loaded in turn (order alternating)
each round: each process's CPU time per request, per thread, from
``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``/proc/<pid>/stat`` counts 10 ms ticks,
which resolved a --quick round to ~5 %), split into the main thread (the event loop: the
serving path), the usage sink workers (threads named ``usage-*``) and the rest, and the
ratio of the totals per round. ``--server-only`` skips the sink rates. ``--baseline-src DIR``
adds a third server, usage on, run from another source tree (``DIR`` is put on PYTHONPATH,
e.g. a ``git worktree`` of the commit before a change), loaded in the same rounds: the
before / after comparison, paired. ``--together`` loads the servers at the same time in each
round (each with its own 32 clients) instead of in turn: on a shared machine every server then
sees the same interference, which pairs rounds far more tightly, at the cost of each serving a
share of the client's rate (the sink worker's per-batch costs weigh more per request).
By default the servers run on the first CPU and the load generator (httpx, ~2 ms of CPU per
request) on the others, so its CPU time never lands between a server's instructions
(``--no-pin`` to share). ``--model demo`` serves the trained demo model instead of the fake
one (real inference on the CPU, the reference server's main job; same requests): no bar is
set on it, its on / off ratio says what recording weighs in a real request. Bars (fake model):
recording adds < 2 % CPU per request; each sink drains >= 10x the request rate the server
served in this run.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from _common import bar, parse_args, pin_cpus, print_bars, print_table, summary, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from servekit.usage import Outbox, SinkWorker, UsageRecord, open_sink

KEYS = [{"key": f"sk-bench-{i}", "tenant": f"t{i % 2}"} for i in range(4)]


def _records(n: int, tag: str) -> list[UsageRecord]:
    now = datetime.now(UTC)
    return [UsageRecord(request_id=f"{tag}-{i}", idempotency_key=f"{tag}-{i}", time=now,
                        key_id=f"kid{i % 4}", tenant=f"t{i % 2}", model="fake",
                        replicas=("r0",), prompt_tokens=32, completion_tokens=16,
                        finish_reason="length", total_time=0.1, final_chunk_sent=True)
            for i in range(n)]


def sink_rate(url: str, n: int, tag: str, data: Path) -> float:
    """Records/s one worker drains from a full outbox into the sink at ``url``."""
    box = Outbox(data / f"outbox-{tag}.db", ["s"])
    for record in _records(n, tag):
        box.mark_sent(box.append(record))
    box.flush()
    worker = SinkWorker(box, "s", open_sink(url, data), batch_size=1000)
    start = time.perf_counter()
    assert worker.drain() == n
    elapsed = time.perf_counter() - start
    worker.stop()
    return n / elapsed


def _thread_cpu(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of ``pid``: (its kind: main / usage / other, CPU ns so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
        tid = int(task.name)
        out[tid] = ("main" if tid == pid else "usage" if comm.startswith("usage-")
                    else "other", ns)
    return out


def _cpu_delta(before: dict[int, tuple[str, int]],
               after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds per thread kind between two :func:`_thread_cpu` readings (a thread that
    ended meanwhile is lost; the server's threads live as long as it does)."""
    kinds = {"main": 0.0, "usage": 0.0, "other": 0.0}
    for tid, (kind, ns) in after.items():
        kinds[kind] += (ns - before.get(tid, (kind, 0))[1]) / 1e9
    return kinds


def _start_server(port: int, data: Path, usage: bool, src: str | None = None,
                  preexec: Any = None, model: str = "fake") -> subprocess.Popen[bytes]:
    # the demo model is served under the fake model's name, so the load is the same requests
    engine = ["--fake"] if model == "fake" else ["--served-model-name", "fake"]
    argv = [sys.executable, "-m", "servekit.server.cli", "serve", *engine, "--port",
            str(port), "--data-dir", str(data), "--log-level", "warning"]
    if not usage:
        argv += ["--usage", "none"]
    env = {**os.environ, "SERVEKIT_API_KEYS": json.dumps(KEYS)}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(argv, env=env, preexec_fn=preexec)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def _load(base: str, n: int) -> None:
    limit = anyio.Semaphore(32)
    prompt = " ".join(["tok"] * 32)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with limit:
            body = {"model": "fake", "prompt": prompt, "max_tokens": 16, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", f"{base}/v1/completions", json=body, headers={
                    "authorization": f"Bearer {KEYS[i % 4]['key']}"}) as resp:
                assert resp.status_code == 200, resp.status_code
                async for _ in resp.aiter_bytes():
                    pass

    async with httpx.AsyncClient(timeout=60) as client, anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, client, i)


class _Server:
    """A ``servekit serve`` process (``model``: ``fake`` or ``demo``) on a free port, with or
    without usage recording."""

    def __init__(self, usage: bool, data: Path, src: str | None = None,
                 preexec: Any = None, model: str = "fake") -> None:
        from tests.usage.servers import free_port

        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = _start_server(port, data, usage, src, preexec, model)
        anyio.run(_load, self.base, 64)  # warm up

    def cpu_us_per_request(self, n: int) -> tuple[dict[str, float], float]:
        """(CPU µs per request by thread kind, and "total"; requests/s) for ``n`` requests."""
        return _rounds_together([self], n)[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _rounds_together(servers: list[_Server], n: int) -> list[tuple[dict[str, float], float]]:
    """:meth:`_Server.cpu_us_per_request` for each of ``servers``, loaded at the same time."""
    walls: dict[int, float] = {}

    async def load_all() -> None:
        async def one(i: int, server: _Server) -> None:
            t0 = time.perf_counter()
            await _load(server.base, n)
            walls[i] = time.perf_counter() - t0

        async with anyio.create_task_group() as tg:
            for i, server in enumerate(servers):
                tg.start_soon(one, i, server)

    cpu0 = [_thread_cpu(s.proc.pid) for s in servers]
    anyio.run(load_all)
    time.sleep(0.5)  # the sink worker's share of the round lands in the CPU count
    out = []
    for i, server in enumerate(servers):
        used = _cpu_delta(cpu0[i], _thread_cpu(server.proc.pid))
        per = {k: 1e6 * v / n for k, v in used.items()}
        per["total"] = sum(per.values())
        out.append((per, n / walls[i]))
    return out


def _extra(parser: Any) -> None:
    parser.add_argument("--server-only", action="store_true",
                        help="only the server CPU part (skip the sink rates)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per server round (default 300 quick, 2000 full)")
    parser.add_argument("--baseline-src", default=None, metavar="DIR",
                        help="also run a usage-on server from this source tree (on "
                             "PYTHONPATH), in the same rounds")
    parser.add_argument("--no-pin", action="store_true",
                        help="let servers and the load generator share every CPU (default: "
                             "servers on the first CPU, the load generator on the others)")
    parser.add_argument("--model", choices=("fake", "demo"), default="fake",
                        help="the servers' model: the fake one the bar is set on (default), or "
                             "the trained demo model (real inference on the CPU)")
    parser.add_argument("--together", action="store_true",
                        help="load the servers at the same time in each round, not in turn")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    quick = args.quick
    rounds = args.rounds or (3 if quick else 5)
    n_records = 5_000 if quick else 50_000
    n_requests = args.requests or (300 if quick else 2_000)
    root = Path(tempfile.mkdtemp(prefix="servekit-bench-usage-"))

    from tests.usage.servers import Postgres

    pg_rates: list[float] = []
    ch_rates: list[float] = []
    if not args.server_only:
        pg = Postgres(root / "pg")
        try:
            pg_rates = [sink_rate(pg.dsn, n_records, f"pg{r}", root) for r in range(rounds)]
        finally:
            pg.stop()
        ch_rates = [sink_rate(f"chdb://{root}/chdb", n_records, f"ch{r}", root)
                    for r in range(rounds)]

    kinds = ["off", "on"] + (["baseline"] if args.baseline_src else [])
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    rate: list[float] = []
    ratio: dict[str, list[float]] = {"on": [], "baseline": []}
    on_server_cpu, load_cpus = pin_cpus(not args.no_pin)
    pin = bool(load_cpus)
    servers = {"off": _Server(False, root / "data-off", preexec=on_server_cpu,
                              model=args.model),
               "on": _Server(True, root / "data-on", preexec=on_server_cpu, model=args.model)}
    if args.baseline_src:
        servers["baseline"] = _Server(True, root / "data-baseline", args.baseline_src,
                                      on_server_cpu, args.model)
    try:
        for r in range(rounds):
            if args.together:
                for kind, (us, rps) in zip(kinds, _rounds_together(
                        [servers[k] for k in kinds], n_requests), strict=True):
                    cpu[kind].append(us)
                    rate.append(rps)
            else:
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    us, rps = servers[kind].cpu_us_per_request(n_requests)
                    cpu[kind].append(us)
                    rate.append(rps)
            off = cpu["off"][-1]
            line = f"round {r + 1}/{rounds}: CPU µs/request off {off['total']:.0f}"
            for kind in kinds[1:]:
                on = cpu[kind][-1]
                ratio[kind].append(on["total"] / off["total"])
                line += (f"; {kind} {on['total']:.0f} (main {on['main']:.0f}, usage "
                         f"{on['usage']:.0f}, other {on['other']:.0f}): ratio "
                         f"{ratio[kind][-1]:.3f}")
            print(line, flush=True)
    finally:
        for server in servers.values():
            server.stop()

    req_rate = statistics.median(rate)
    rows = []
    if not args.server_only:
        rows += [{"what": "outbox -> PostgreSQL (records/s)", **summary(pg_rates)},
                 {"what": "outbox -> ClickHouse/chDB (records/s)", **summary(ch_rates)}]
    labels = {"off": "no usage", "on": "usage on (SQLite)",
              "baseline": "usage on, baseline src"}
    for kind in kinds:
        for part in ("total", "main", "usage", "other"):
            if part == "usage" and kind == "off":
                continue
            rows.append({"what": f"server CPU µs/request, {labels[kind]}, {part} thread"
                                 f"{'s' if part in ('total', 'other', 'usage') else ''}",
                         **summary([c[part] for c in cpu[kind]])})
    for kind in kinds[1:]:
        added = [on["main"] - off["main"] for on, off in zip(cpu[kind], cpu["off"],
                                                             strict=True)]
        suffix = "" if kind == "on" else ", baseline src"
        rows += [{"what": f"added CPU µs/request, main thread (paired rounds){suffix}",
                  **summary(added)},
                 {"what": f"server CPU per request, usage on / off{suffix}",
                  **summary(ratio[kind])}]
    if args.baseline_src:
        rows.append({"what": "server CPU per request, usage on / baseline src",
                     **summary([a / b for a, b in zip(ratio["on"], ratio["baseline"],
                                                      strict=True)])})
    rows.append({"what": "server requests/s (32 clients)", **summary(rate)})
    print_table(rows, ["what", "median", "min", "max"],
                title=f"usage: {n_records} records per sink round, {n_requests} requests per "
                      f"server round ({args.model} model), {rounds} rounds")
    added = statistics.median(ratio["on"]) - 1.0
    bars: dict[str, Any] = {}  # set on the fake model; the demo model's ratio is in the rows
    if args.model == "fake":
        bars["usage_added_cpu_fraction"] = bar(added, 0.02, higher_is_better=False)
    if not args.server_only:
        bars["postgres_over_request_rate"] = bar(statistics.median(pg_rates) / req_rate, 10.0)
        bars["clickhouse_over_request_rate"] = bar(statistics.median(ch_rates) / req_rate, 10.0)
    print_bars(bars)
    write_json(args.json, "usage", rows, bars, rounds=rounds, records=n_records,
               requests=n_requests, load_average=os.getloadavg(),
               baseline_src=args.baseline_src, together=args.together, pinned=pin,
               model=args.model)


if __name__ == "__main__":
    main()
