"""Output throughput counts the tokens emitted within the window, whenever their request arrived:
the rule (:func:`tokens_in_window`) that ``bench_sim.py --validate`` applies to the server's
streamed tokens and that the simulator applies to its steps' tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.sim import Simulator
from servekit.sim.results import tokens_in_window

from .conftest import small_scenario


def test_tokens_streamed_after_the_load_ended_do_not_count() -> None:
    # an overloaded 10 s load: the queue grows, so the later requests' tokens come after the
    # load's end (the client's receive times, seconds from the load's start)
    duration = 10.0
    streamed = [
        [0.5, 0.6, 0.7, 0.8],           # served at once
        [4.0, 6.0, 9.9, 10.0],          # its last token exactly at the end still counts
        [9.5, 12.0, 15.0, 20.0],        # half of it came after the end
        [30.0, 31.0, 32.0, 33.0],       # sent at 9 s, every token 20 s after the end
    ]
    served = tokens_in_window((t for times in streamed for t in times), 0.0, duration)
    assert served == 4 + 4 + 1
    assert served / duration == 0.9
    # what the harness counted before: every token of every request sent during the load,
    # over the load's duration, i.e. the offered load (1.6 tok/s), not what was served
    offered = sum(len(times) for times in streamed) / duration
    assert offered == 1.6
    assert offered > served / duration


def _bench_sim() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sim.py"
    spec = importlib.util.spec_from_file_location("bench_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_sim", module)
    spec.loader.exec_module(module)
    return module


def test_the_validation_harness_counts_the_servers_tokens_received_within_the_load() -> None:
    # (send time, the client's receive time of each chunk, tokens), seconds from the load's
    # start; a token whose text the detokenizer held back came in a later chunk
    sent = [(0.4, [0.5, 0.6, 0.7, 0.8], 4), (3.9, [4.0, 6.0, 9.9, 10.0], 4),
            (9.0, [9.5, 12.0, 15.0, 20.0], 4), (9.1, [30.0, 31.0, 32.0, 33.0], 4),
            (9.2, [9.3, 9.5, 9.75], 4),  # 4 tokens in 3 chunks, all within the load
            (9.5, [], 0)]  # a dropped connection
    row = _bench_sim().load_row(sent, 10.0, requests=6)
    assert row["out_tok_per_s"] == 1.3  # 4 + 4 + 1 + 4 tokens
    assert row["sent_tok_per_s"] == 2.0  # every token, whenever it came: what it was before
    assert row["last_token_s"] == 33.0
    assert row["ttft_p50"] == pytest.approx(0.1)  # of 0.1, 0.1, 0.1, 0.5 and 20.9 s
    # TTFT within 1 s and a mean ITL within 0.2 s, over tokens as the simulator's: the 5th's
    # is 0.45 s / 3 gaps (0.225 s over its 2 chunk gaps)
    assert row["goodput_rps"] == 0.2
    assert row["requests"] == 6


def test_a_loads_ttft_percentiles_are_taken_over_all_its_repeats_requests() -> None:
    """The validation's TTFT checks pool a load's repeats (a p90 of one 40 s trace is a few
    bursts); a run that kept no per-request TTFTs falls back to medians over repeats."""
    bench = _bench_sim()
    fast, slow = [10.0] * 90 + [20.0] * 10, [10.0] * 50 + [100.0] * 50  # ms, two repeats
    rows = []
    for load in bench.TOLERANCES:
        for source in ("server", "sim"):
            for rep, ttfts in enumerate((fast, slow)):
                ttfts_ms = ttfts if source == "server" else [t * 1.1 for t in ttfts]
                rows.append({"load": load, "source": source, "repeat": rep,
                             "ttft_p50": float(np.percentile(ttfts_ms, 50)) / 1e3,
                             "ttft_p90": float(np.percentile(ttfts_ms, 90)) / 1e3,
                             "itl_p50": 1.0, "out_tok_per_s": 1.0, "goodput_rps": 1.0,
                             "ttfts_ms": ttfts_ms})
    pooled = bench._validation_summary(rows, "sim")["light ttft_p90"]
    assert pooled["server"] == pytest.approx(0.1)  # 60 of 200 requests at 100 ms
    assert pooled["error"] == pytest.approx(0.1)
    medians = bench._validation_summary(rows, "sim", pooled=False)["light ttft_p90"]
    assert medians["server"] == pytest.approx(  # the median of the two repeats' p90s
        (np.percentile(fast, 90) + np.percentile(slow, 90)) / 2 / 1e3)
    assert medians["server"] < 0.06
    for row in rows:
        row.pop("ttfts_ms")
    assert bench._validation_summary(rows, "sim")["light ttft_p90"] == medians


@given(st.lists(st.lists(st.floats(0.0, 100.0), max_size=8), max_size=12),
       st.floats(0.1, 100.0))
def test_served_is_at_most_offered_and_equal_once_every_token_came_by_the_end(
        streamed: list[list[float]], duration: float) -> None:
    served = tokens_in_window((t for times in streamed for t in times), 0.0, duration)
    offered = sum(len(times) for times in streamed)
    assert served <= offered
    assert (served == offered) == all(t <= duration for times in streamed for t in times)


class _EmissionTimes(Simulator):
    """The simulator, noting the time of every output token its steps emit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.emitted: list[float] = []
        for rep in self.replicas.values():
            update = rep.sched.update

            def noted(out: Any, ids: Any, update: Any = update) -> Any:
                res = update(out, ids)
                self.emitted.extend([self.now] * len(res.requests))
                return res

            rep.sched.update = noted  # type: ignore[method-assign,assignment]


def test_the_simulators_throughput_is_the_tokens_its_steps_emitted_within_the_window() -> None:
    # overloaded (the two replicas serve ~12 req/s), with a warmup: tokens come before the
    # window and, drained after the arrivals end, long after it
    sc = small_scenario(duration=30.0, warmup=5.0, workload={"rate": 30.0})
    sim = _EmissionTimes(sc)
    result = sim.run()
    window = sc.duration - sc.warmup
    served = tokens_in_window(sim.emitted, sc.warmup, sc.duration)
    assert result.throughput["output_tokens_per_s"] == served / window
    assert len(sim.emitted) == sum(r.n_out for r in result.records)  # every token was noted
    late = sum(1 for t in sim.emitted if t > sc.duration)
    assert late > 0.3 * len(sim.emitted)  # the case the two counts differ in
    offered = sum(r.n_out for r in result.records
                  if sc.warmup <= r.arrival <= sc.duration) / window
    assert offered > 1.5 * served / window


async def _sse_server(responses: list[bytes]) -> tuple[Any, int]:
    """A server on 127.0.0.1 that answers each connection's request with the next of
    ``responses`` (raw HTTP/1.1 bytes)."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(responses.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunked(*events: list[bytes]) -> bytes:
    """A 200 SSE response, one HTTP chunk per list of events (events ready together)."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(b"".join(e)), b"".join(e)) for e in events)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


def test_the_validation_harness_reads_every_token_of_a_chunk_and_the_usage() -> None:
    import asyncio

    bench = _bench_sim()
    token = b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"completion_tokens":5}}\n\n'
    rejected = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: 2\r\n\r\n{}")

    async def run() -> list[tuple[list[float], int]]:
        # two tokens ready together in one chunk, one alone, the usage (one token held back by
        # the detokenizer: 5 tokens, 4 chunks' worth of events), then a request refused
        server, port = await _sse_server([
            _chunked([token, token], [token], [token], [usage, b"data: [DONE]\n\n"]), rejected])
        async with server:
            return [await bench._stream(port, [1, 2, 3], 5) for _ in range(2)]

    (times, tokens), refused = asyncio.run(run())
    assert len(times) == 4 and times == sorted(times)
    assert times[0] == times[1]  # one chunk: one arrival time for both of its tokens
    assert tokens == 5
    assert refused == ([], 0)
