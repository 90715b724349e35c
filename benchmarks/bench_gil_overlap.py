"""How much of the demo engine's forward overlaps the front end's Python work.

The server runs ``engine.execute`` (the forward and sampling) in a worker thread while its event
loop streams the previous step's tokens and admits requests. Whether that work overlaps the
forward depends on how much of the forward releases the GIL: a forward of large kernels does,
the demo model (hidden size 192, 4 layers) is mostly Python dispatch, which does not. And the
worker needs the GIL to start: the front end's work that is ready when the step is handed over
(the tokens just delivered) runs first unless it lasts past the switch interval (5 ms). The
control, a "forward" that sleeps, needs the GIL only to start and to return.

Measured in one process, interleaved per round (medians over rounds): the forward of a fixed
step alone (``T_f``), a pure-Python stand-in for the front end (JSON-encoding SSE chunks) alone,
sized to take about as long (``T_g``), and both at once, the forward in a worker thread as in the
server (``T_both``: until both are done). ``overlap = (T_f + T_g - T_both) / min(T_f, T_g)``:
1 when the step takes ``max(forward, front end)``, 0 when it takes their sum. Runs no server.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, print_table, write_json


def _frontend(chunks: int) -> int:
    """Python work like streaming ``chunks`` tokens: build and encode one SSE chunk each."""
    size = 0
    for i in range(chunks):
        body = {"id": "cmpl-0123456789", "object": "text_completion", "created": 1765000000,
                "model": "servekit-demo", "choices": [{"index": 0, "text": f"tok{i}",
                                                       "logprobs": None, "finish_reason": None}]}
        size += len(b"data: " + json.dumps(body).encode() + b"\n\n")
    return size


def _plan(engine: Any, batch: int, prompt: int) -> Any:
    """A pure-decode step of ``batch`` rows (every prompt prefilled), scheduled, not run."""
    from servekit.sched.params import SamplingParams

    for i in range(batch):
        engine.add_request(list(range(1 + i, 1 + i + prompt)),
                           SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    while True:
        plan = engine.schedule()
        if plan.out.num_samples == batch and not any(
                n > 1 for n in plan.out.num_new_tokens):
            return plan
        engine.finish(plan, engine.execute(plan))


def _median_time(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_overlap(case: str, forward: Any, rounds: int) -> dict[str, Any]:
    """``forward()`` against the front end's stand-in, alone and beside each other."""
    for _ in range(20):  # warm up
        forward()
    t_f = _median_time(forward, 50)
    chunks = 50
    while _median_time(partial(_frontend, chunks), 5) < t_f:  # the front end about as long
        chunks = int(chunks * 1.3) + 1
    f_alone, g_alone, both = [], [], []
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        for _ in range(rounds):
            t0 = time.perf_counter()
            forward()
            t1 = time.perf_counter()
            _frontend(chunks)
            t2 = time.perf_counter()
            fut = pool.submit(forward)
            _frontend(chunks)
            fut.result()
            t3 = time.perf_counter()
            f_alone.append(t1 - t0)
            g_alone.append(t2 - t1)
            both.append(t3 - t2)
    tf, tg, tb = (statistics.median(x) for x in (f_alone, g_alone, both))
    return {"case": case, "forward_ms": tf * 1e3, "frontend_ms": tg * 1e3,
            "both_ms": tb * 1e3, "sum_ms": (tf + tg) * 1e3, "max_ms": max(tf, tg) * 1e3,
            "overlap": (tf + tg - tb) / min(tf, tg), "chunks": chunks}


def main() -> None:
    args = parse_args(__doc__ or "", None)
    rounds = args.rounds or (40 if args.quick else 200)
    import os

    load = os.getloadavg()
    import torch

    from servekit.engine import EngineConfig, LLMEngine

    torch.set_num_threads(1)  # as the validation's server and in-process profile
    from importlib.resources import files

    rows = []
    for batch in (1, 16):
        engine = LLMEngine(str(files("servekit") / "demo_model"),
                           config=EngineConfig(max_num_seqs=16, max_num_batched_tokens=256))
        plan = _plan(engine, batch, 64)
        rows.append(measure_overlap(f"demo engine step, {batch} decode rows",
                                    partial(engine.execute, plan), rounds))
        engine.finish(plan, None)
        engine.abort_all()
    # control: a "forward" that holds the GIL only to start and to return
    rows.append(measure_overlap("control: time.sleep(4 ms)", lambda: time.sleep(0.004), rounds))
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print_table(rows, ["case", "forward_ms", "frontend_ms", "both_ms", "sum_ms", "max_ms",
                       "overlap"], "forward in a worker thread beside the front end's Python")
    write_json(args.json, "gil_overlap", rows, {}, load_average=list(load))


if __name__ == "__main__":
    main()
