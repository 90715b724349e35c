"""gRPC front-end benchmark: the instant fake model over gRPC.

The server runs in its own process (``servekit.server.grpc.GrpcServer`` on a FakeEngine), the
clients in this one (grpc.aio). Rows: streamed tokens/s (``GenerateStream``, C concurrent
streams), the same multiplexed on one bidirectional ``Session``, and requests/s of short unary
``Generate`` calls.

    python benchmarks/bench_grpc.py --quick --json benchmarks/results/grpc-cpu-2026-11-27.json

A bare ``grpc.aio`` server streaming the same messages (``_bare_peers.py``) runs beside it,
rounds interleaved: its tokens/s and the servekit/bare ratio.

The comparison with HTTP (the same fake model, its rows and the gRPC/HTTP ratios) is
``bench_server.py``'s: it calls :func:`grpc_rows` and :func:`ratio_rows` (the import goes one
way, server -> grpc).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bare_peers import PeerProcess
from _common import bar, parse_args, print_bars, print_table, stop_process, summary, write_json
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

_SERVER = """
import asyncio, sys
from servekit.server.fake import FakeEngine
from servekit.server.grpc import GrpcServer
from servekit.server.service import GenerationService

async def main():
    service = GenerationService(FakeEngine(model_name="fake"))
    service.state.set_ready()
    server = GrpcServer(service, port=int(sys.argv[1]))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GrpcServerProcess:
    """A gRPC-only fake-model server in a subprocess."""

    def __init__(self) -> None:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"gRPC server did not start: {err[-2000:]}")

    def stop(self) -> None:
        stop_process(self.proc)


def _request(max_tokens: int, rid: str = "") -> Any:
    return pb.GenerateRequest(model="fake", prompt="hello", max_tokens=max_tokens, request_id=rid)


async def stream_tokens(address: str, concurrency: int, max_tokens: int, streams: int
                        ) -> tuple[int, float, int]:
    """``streams`` GenerateStream calls, ``concurrency`` at a time, on one channel;
    (tokens, seconds, chunks received)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        left, total, chunks = streams, 0, 0

        async def worker() -> None:
            nonlocal left, total, chunks
            while left > 0:
                left -= 1
                async for chunk in stub.GenerateStream(_request(max_tokens)):
                    total += len(chunk.token_ids)
                    chunks += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total, time.perf_counter() - start, chunks


async def session_tokens(address: str, concurrency: int, max_tokens: int, streams: int
                         ) -> tuple[int, float, int]:
    """``streams`` requests multiplexed on ONE Session, ``concurrency`` open at a time;
    (tokens, seconds, responses received)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GenerationStub(channel).Session()
        sent, done, total, chunks = 0, 0, 0, 0
        start = time.perf_counter()
        for _ in range(min(concurrency, streams)):
            await call.write(pb.SessionRequest(generate=_request(max_tokens, f"r{sent}")))
            sent += 1
        while done < streams:
            response = await call.read()
            total += len(response.chunk.token_ids)
            chunks += 1
            if response.final:
                done += 1
                if sent < streams:
                    await call.write(pb.SessionRequest(generate=_request(max_tokens, f"r{sent}")))
                    sent += 1
        await call.done_writing()
        return total, time.perf_counter() - start, chunks


async def unary_requests(address: str, concurrency: int, requests: int) -> tuple[int, float]:
    """``requests`` unary 8-token Generate calls, ``concurrency`` at a time."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                response = await stub.Generate(_request(8))
                assert response.usage.completion_tokens == 8

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests, time.perf_counter() - start


def _row(scenario: str, setting: str, samples: list[float]) -> dict[str, Any]:
    s = summary(samples)
    return {"scenario": scenario, "setting": setting, **s}


def grpc_rows(quick: bool, rounds: int, address: str | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The gRPC rows (tokens/s streamed and on a Session, requests/s) and the gRPC bar.

    Starts its own fake-model gRPC server unless ``address`` names one.
    """
    server = None if address is not None else GrpcServerProcess()
    target = address if address is not None else server.address  # type: ignore[union-attr]
    peer = PeerProcess("grpc")
    concurrency, max_tokens = 32, 1000
    streams = 64 if quick else 256
    n_unary = 500 if quick else 2000
    try:
        for where in (target, peer.address):
            asyncio.run(stream_tokens(where, 8, 50, 16))  # warm up
        tps, sps, rps, t_per_chunk, s_per_chunk, bare, ratio = [], [], [], [], [], [], []
        for _ in range(rounds):
            tokens, secs, chunks = asyncio.run(stream_tokens(target, concurrency, max_tokens,
                                                             streams))
            assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
            tps.append(tokens / secs)
            t_per_chunk.append(tokens / chunks)
            tokens, secs, _ = asyncio.run(stream_tokens(peer.address, concurrency, max_tokens,
                                                        streams))
            assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
            bare.append(tokens / secs)
            ratio.append(tps[-1] / bare[-1])
            tokens, secs, chunks = asyncio.run(session_tokens(target, concurrency, max_tokens,
                                                              streams))
            assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
            sps.append(tokens / secs)
            s_per_chunk.append(tokens / chunks)
            n, secs = asyncio.run(unary_requests(target, concurrency, n_unary))
            rps.append(n / secs)
    finally:
        peer.stop()
        if server is not None:
            server.stop()
    rows = [
        _row("gRPC: streamed tokens/s", f"{concurrency} GenerateStream x {max_tokens} tok", tps),
        _row("gRPC: Session tokens/s", f"{concurrency} open on 1 stream x {max_tokens} tok", sps),
        _row("gRPC: requests/s", f"{concurrency} clients, 8 tok, unary", rps),
        # deltas merge while a write is in flight (servekit/server/grpc/outbox.py): say how much
        _row("gRPC: tokens per chunk, stream", "merged under backpressure", t_per_chunk),
        _row("gRPC: tokens per chunk, Session", "merged under backpressure", s_per_chunk),
        _row("bare grpc.aio: streamed tokens/s", f"{concurrency} streams x {max_tokens} tok, "
             "1 message/tok", bare),
        _row("ratio servekit/bare grpc.aio: streamed tokens/s", "per round, paired", ratio),
    ]
    return rows, {"grpc_streamed_tokens_per_s": bar(rows[0]["median"], 20_000.0)}


def ratio_rows(grpc: list[dict[str, Any]], http: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gRPC / HTTP medians for streamed tokens/s and requests/s (``http`` from bench_server)."""
    def median(rows: list[dict[str, Any]], scenario: str) -> float:
        return float(next(r["median"] for r in rows if r["scenario"] == scenario))

    return [{"scenario": f"ratio gRPC/HTTP: {name}", "setting": "medians",
             "median": median(grpc, g) / median(http, h)}
            for g, h, name in (("gRPC: streamed tokens/s",
                                "servekit --fake, 1 tok per loop pass: streamed tokens/s",
                                "streamed tokens/s"),
                               ("gRPC: requests/s", "fake: requests/s", "requests/s"))]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds = args.rounds or 3
    rows, bars = grpc_rows(args.quick, rounds)
    print_table(rows, ["scenario", "setting", "median", "min", "max"],
                title="servekit gRPC front end (fake instant model, server in its own process)")
    print_bars(bars)
    write_json(args.json, "grpc", rows, bars)


if __name__ == "__main__":
    main()
