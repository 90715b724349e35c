"""Paged decode attention on a GPU: achieved bandwidth as a fraction of the card's copy bandwidth.

Workload (issue 4): bf16, page 16, 32 query / 8 KV heads, head dim 128, one query row per
sequence, at (B, L) = (1, 32768), (64, 4096), (256, 1024), with scattered block tables. First the
card's device-to-device copy bandwidth is measured (``dst.copy_(src)`` of 1 GiB: read + write
bytes per second). Then, for each shape, servekit's split-K decode kernel and the peer, torch
SDPA (``enable_gqa``) on K/V already gathered into contiguous ``[B, 8, L, 128]`` tensors, run in
the same process after a correctness check against ``servekit.ops.reference``. Each is timed as
a CUDA graph of back-to-back calls (``--eager``: plain launches), so the numbers are the GPU's
time, not Python's launch overhead. Bytes per call
are what decode must read and write: the context's K and V, the queries, the outputs and the
block table. Bars: >= 80 % of copy bandwidth at (64, 4096) and >= 70 % at (1, 32768).

Needs CUDA. ``--quick --interpret`` runs a tiny version on CPU through the Triton interpreter to
check the script itself; its timings say nothing about GPU speed and it measures no bar.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--interpret" in sys.argv:  # must be set before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bar,
    machine_info,
    measure,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)
from servekit.ops import reference
from servekit.ops import triton as kernels

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SHAPES = [(1, 32768), (64, 4096), (256, 1024)]
INTERPRET_SHAPES = [(1, 512), (4, 96)]
BARS = {(64, 4096): 0.80, (1, 32768): 0.70}
RESULTS = Path(__file__).resolve().parent / "results"


def gpu_samples(fn: Callable[[], Any], rounds: int, iters: int) -> list[float]:
    """Seconds per call, one sample per round of ``iters`` back-to-back calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    return samples


def graph_samples(fn: Callable[[], Any], rounds: int, iters: int) -> list[float]:
    """Like :func:`gpu_samples`, with the ``iters`` calls captured in one CUDA graph, so that
    host-side launch cost (Python, Triton's launcher) is excluded, as in a graph-captured engine."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return [t / iters for t in gpu_samples(graph.replay, rounds, 1)]


def copy_bandwidth(rounds: int, quick: bool) -> dict[str, float]:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = (256 if quick else 1024) << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    s = summary(gpu_samples(lambda: dst.copy_(src), rounds, 20))
    return {"median": 2 * n / s["median"], "min": 2 * n / s["max"], "max": 2 * n / s["min"]}


def decode_inputs(batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A decode batch: every sequence `length` tokens, pages scattered over the cache."""
    gen = torch.Generator(device).manual_seed(batch * 7919 + length)
    pages = length // BLOCK_SIZE
    num_blocks = batch * pages
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, pages)
    return {
        "query": torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, generator=gen, device=device).to(DTYPE),
        "k_cache": torch.randn(shape, generator=gen, device=device, dtype=DTYPE),
        "v_cache": torch.randn(shape, generator=gen, device=device, dtype=DTYPE),
        "block_tables": tables.to(torch.int32),
        "seq_lens": torch.full((batch,), length, dtype=torch.int32, device=device),
        "query_start_loc": torch.arange(batch + 1, dtype=torch.int32, device=device),
    }


def gather(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of every sequence as contiguous ``[B, num_kv_heads, L, head_dim]`` tensors."""
    tables = inp["block_tables"].long()
    k = inp["k_cache"][tables].flatten(1, 2).transpose(1, 2).contiguous()
    v = inp["v_cache"][tables].flatten(1, 2).transpose(1, 2).contiguous()
    return k, v


def bytes_moved(batch: int, length: int) -> int:
    elem = torch.finfo(DTYPE).bits // 8
    kv = 2 * batch * length * NUM_KV_HEADS * HEAD_DIM * elem
    q_and_out = 2 * batch * NUM_Q_HEADS * HEAD_DIM * elem
    return kv + q_and_out + batch * (length // BLOCK_SIZE) * 4


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max())


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interpret", action="store_true", help="tiny CPU smoke run via TRITON_INTERPRET"
    )
    parser.add_argument(
        "--eager", action="store_true", help="time eager launches instead of CUDA graphs"
    )


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        add_options,
    )
    cuda = torch.cuda.is_available()
    if not cuda and not args.interpret:
        sys.exit(
            "bench_attention.py needs a CUDA GPU: it measures decode bandwidth against the card's "
            "copy bandwidth. Use --quick --interpret for a CPU smoke run of the script."
        )
    device = torch.device("cuda" if cuda and not args.interpret else "cpu")
    on_gpu = device.type == "cuda"
    rounds = args.rounds or (3 if args.interpret else 5 if args.quick else 10)
    shapes = SHAPES if on_gpu else INTERPRET_SHAPES
    scale = HEAD_DIM**-0.5

    def timed(fn: Callable[[], Any]) -> list[float]:
        if not on_gpu:
            return measure(fn, rounds)
        iters = 20 if args.quick else 50
        return (gpu_samples if args.eager else graph_samples)(fn, rounds, iters)

    copy_bw = copy_bandwidth(rounds, args.quick) if on_gpu else None
    rows: list[dict[str, Any]] = []
    fractions: dict[tuple[int, int], float] = {}
    for batch, length in shapes:
        inp = decode_inputs(batch, length, device)
        out = torch.empty_like(inp["query"])
        k, v = gather(inp)
        q4 = inp["query"].unsqueeze(2)  # [B, Hq, 1, D]

        def servekit(inp: dict[str, torch.Tensor] = inp, out: torch.Tensor = out) -> None:
            kernels.paged_attention(**inp, scale=scale, out=out)

        def sdpa(q4: torch.Tensor = q4, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

        # correctness on this device before any timing
        servekit()
        expected = reference.paged_attention(**inp, scale=scale)
        errors = {"servekit": rel_error(out, expected),
                  "sdpa": rel_error(sdpa().squeeze(2), expected)}  # fmt: skip
        if errors["servekit"] > 1e-2:
            sys.exit(f"servekit decode is wrong at B={batch}, L={length}: rel error {errors}")

        moved = bytes_moved(batch, length)
        splits = kernels.choose_num_splits(
            batch, NUM_KV_HEADS, length, block_n=kernels.decode_tile_n(),
            sm_count=kernels.num_sms(device),
        )  # fmt: skip
        times = {"servekit": summary(timed(servekit)), "torch SDPA": summary(timed(sdpa))}
        for impl, t in times.items():
            row: dict[str, Any] = {
                "B": batch, "L": length, "impl": impl,
                "us": t["median"] * 1e6, "us_min": t["min"] * 1e6, "us_max": t["max"] * 1e6,
                "GB/s": moved / t["median"] / 1e9,
                "rel_err": errors["servekit" if impl == "servekit" else "sdpa"],
                "splits": splits if impl == "servekit" else "",
            }  # fmt: skip
            if copy_bw is not None:
                row["frac_copy_bw"] = moved / t["median"] / copy_bw["median"]
            rows.append(row)
        rows[-2]["speedup_vs_sdpa"] = times["torch SDPA"]["median"] / times["servekit"]["median"]
        if copy_bw is not None:
            fractions[(batch, length)] = rows[-2]["frac_copy_bw"]

    columns = ["B", "L", "impl", "splits", "us", "us_min", "us_max", "GB/s", "rel_err"]
    if copy_bw is not None:
        columns += ["frac_copy_bw"]
        print(f"copy bandwidth: {copy_bw['median'] / 1e9:.0f} GB/s "
              f"({copy_bw['min'] / 1e9:.0f}-{copy_bw['max'] / 1e9:.0f})")  # fmt: skip
    print_table(rows, [*columns, "speedup_vs_sdpa"], title="paged decode attention, bf16")

    bars: dict[str, Any] = {}
    for (batch, length), target in BARS.items():
        name = f"decode_B{batch}_L{length}_frac_copy_bw"
        if (batch, length) in fractions:
            bars[name] = bar(fractions[(batch, length)], target)
        else:
            bars[name] = {"value": None, "target": target, "holds": None,
                          "note": "not measured: needs a CUDA GPU"}  # fmt: skip
    if on_gpu:
        print_bars(bars)
    else:
        print("\nbars: not measured (CPU interpreter smoke run; the bars need a CUDA GPU)")
    path = args.json
    if path is None and on_gpu:
        card = machine_info().get("card", "gpu").lower().replace(" ", "-")
        path = RESULTS / f"attention-{card}-{time.strftime('%Y-%m-%d')}.json"
    write_json(path, "attention", rows, bars, copy_bandwidth_bytes_per_s=copy_bw,
               mode="gpu" if on_gpu else "cpu-interpreter-smoke")  # fmt: skip


if __name__ == "__main__":
    main()
