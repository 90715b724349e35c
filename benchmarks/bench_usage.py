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
ratio of the totals per round. ``--server-only`` skips the sink rates.
Bars: recording adds < 2 % CPU per request; each sink drains >= 10x the request rate the
server served in this run.
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

from _common import bar, parse_args, print_bars, print_table, summary, write_json

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


def _start_server(port: int, data: Path, usage: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "servekit.server.cli", "serve", "--fake", "--port",
            str(port), "--data-dir", str(data), "--log-level", "warning"]
    if not usage:
        argv += ["--usage", "none"]
    proc = subprocess.Popen(argv, env={**os.environ, "SERVEKIT_API_KEYS": json.dumps(KEYS)})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
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
    """A ``servekit serve --fake`` process on a free port, with or without usage recording."""

    def __init__(self, usage: bool, data: Path) -> None:
        from tests.usage.servers import free_port

        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = _start_server(port, data, usage)
        anyio.run(_load, self.base, 64)  # warm up

    def cpu_us_per_request(self, n: int) -> tuple[dict[str, float], float]:
        """(CPU µs per request by thread kind, and "total"; requests/s) for ``n`` requests."""
        cpu0, t0 = _thread_cpu(self.proc.pid), time.perf_counter()
        anyio.run(_load, self.base, n)
        wall = time.perf_counter() - t0
        time.sleep(0.5)  # the sink worker's share of the round lands in the CPU count
        used = _cpu_delta(cpu0, _thread_cpu(self.proc.pid))
        per = {k: 1e6 * v / n for k, v in used.items()}
        per["total"] = sum(per.values())
        return per, n / wall

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _extra(parser: Any) -> None:
    parser.add_argument("--server-only", action="store_true",
                        help="only the server CPU part (skip the sink rates)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per server round (default 300 quick, 2000 full)")


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

    cpu: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    rate: list[float] = []
    ratio: list[float] = []
    servers = {usage: _Server(usage, root / f"data-{usage}") for usage in (False, True)}
    try:
        for r in range(rounds):
            for usage in (False, True) if r % 2 == 0 else (True, False):
                us, rps = servers[usage].cpu_us_per_request(n_requests)
                cpu[usage].append(us)
                rate.append(rps)
            on, off = cpu[True][-1], cpu[False][-1]
            ratio.append(on["total"] / off["total"])
            print(f"round {r + 1}/{rounds}: CPU µs/request off {off['total']:.0f} (main "
                  f"{off['main']:.0f}), on {on['total']:.0f} (main {on['main']:.0f}, usage "
                  f"{on['usage']:.0f}, other {on['other']:.0f}): ratio {ratio[-1]:.3f}",
                  flush=True)
    finally:
        for server in servers.values():
            server.stop()

    req_rate = statistics.median(rate)
    rows = []
    if not args.server_only:
        rows += [{"what": "outbox -> PostgreSQL (records/s)", **summary(pg_rates)},
                 {"what": "outbox -> ClickHouse/chDB (records/s)", **summary(ch_rates)}]
    for usage, label in ((False, "no usage"), (True, "usage on (SQLite)")):
        for kind in ("total", "main", "usage", "other"):
            if kind == "usage" and not usage:
                continue
            rows.append({"what": f"server CPU µs/request, {label}, {kind} thread"
                                 f"{'s' if kind in ('total', 'other', 'usage') else ''}",
                         **summary([c[kind] for c in cpu[usage]])})
    main_added = [on["main"] - off["main"] for on, off in zip(cpu[True], cpu[False],
                                                                 strict=True)]
    rows += [
        {"what": "added CPU µs/request, main thread (paired rounds)", **summary(main_added)},
        {"what": "server CPU per request, usage on / off", **summary(ratio)},
        {"what": "server requests/s (32 clients)", **summary(rate)},
    ]
    print_table(rows, ["what", "median", "min", "max"],
                title=f"usage: {n_records} records per sink round, {n_requests} requests per "
                      f"server round, {rounds} rounds")
    added = statistics.median(ratio) - 1.0
    bars = {"usage_added_cpu_fraction": bar(added, 0.02, higher_is_better=False)}
    if not args.server_only:
        bars["postgres_over_request_rate"] = bar(statistics.median(pg_rates) / req_rate, 10.0)
        bars["clickhouse_over_request_rate"] = bar(statistics.median(ch_rates) / req_rate, 10.0)
    print_bars(bars)
    write_json(args.json, "usage", rows, bars, rounds=rounds, records=n_records,
               requests=n_requests)


if __name__ == "__main__":
    main()
