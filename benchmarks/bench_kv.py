"""Benchmark of the KV cache core: per-step costs, hashing throughput, memory per block.

Peer (same process): a nano-vllm-style BlockManager (Block objects, a deque free list with
``remove``, per-block hashing of ``np.array(token_ids).tobytes()`` with xxh64, hashes registered at
allocation), re-implemented below from nano-vllm's algorithm since nano-vllm itself needs a GPU
stack to import.

Workload (issue 2): 512 requests x 2,048 prompt tokens, 16-token blocks, with and without a 50 %
shared prefix. Phases: admit every request (prefix lookup + allocate + commit of the prompt),
decode steps (append one token to each of the 512, allocate, commit; 16 steps so one block
boundary is crossed), free every request. Phases are timed in process CPU time (the machine
running the benchmarks is shared; CPU time is what a step costs). Memory (information, not a
bar): Python bytes per block with every block cached, measured with tracemalloc.

The bar (issue 14): servekit's pure-Python decode step >= 0.8x the peer's speed (peer us /
servekit us) at 512 requests. Absolute microseconds are not bars.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bar,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)
from _nano import BLOCK, NanoBlockManager, NanoSeq
from servekit.kv import BlockPool, KVCacheManager, KVSequence
from servekit.kv.hashing import extend_block_hashes, get_hash_fn

DECODE_STEPS = 16


# -- the peer: nano-vllm's block manager algorithm ---------------------------------------------


def make_prompts(num_requests: int, prompt_len: int, shared: float, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    n_shared = int(prompt_len * shared)
    prefix = rng.integers(0, 32000, n_shared).tolist()
    return [
        prefix + rng.integers(0, 32000, prompt_len - n_shared).tolist() for _ in range(num_requests)
    ]


def run_servekit(prompts: list[list[int]], new_tokens: list[int]) -> dict[str, float]:
    """One round; returns seconds per phase."""
    num_blocks = len(prompts) * (len(prompts[0]) // BLOCK + 2)
    mgr = KVCacheManager(num_blocks, BLOCK)
    seqs = [KVSequence(str(i), list(p)) for i, p in enumerate(prompts)]
    out: dict[str, float] = {}
    t0 = time.process_time()
    for seq in seqs:
        hit = mgr.get_num_cached_tokens(seq)
        n = len(seq.token_ids)
        if not mgr.allocate(seq, n, hit):
            raise RuntimeError("benchmark pool too small")
        mgr.commit(seq, n)
    out["admit"] = time.process_time() - t0
    steps = []
    for tok in new_tokens:
        t0 = time.process_time()
        allocate, commit = mgr.allocate, mgr.commit
        for seq in seqs:
            toks = seq.token_ids
            toks.append(tok)
            n = len(toks)
            if not allocate(seq, n):
                raise RuntimeError("benchmark pool too small")
            commit(seq, n)
        steps.append(time.process_time() - t0)
    out["decode_step"] = float(np.median(steps))
    t0 = time.process_time()
    for seq in seqs:
        mgr.free(seq)
    out["free"] = time.process_time() - t0
    out["hit_rate"] = mgr.prefix_hits / max(mgr.prefix_queries, 1)
    return out


def run_nano(prompts: list[list[int]], new_tokens: list[int]) -> dict[str, float]:
    num_blocks = len(prompts) * (len(prompts[0]) // BLOCK + 2)
    mgr = NanoBlockManager(num_blocks)
    seqs = [NanoSeq(i, p, 0) for i, p in enumerate(prompts)]
    out: dict[str, float] = {}
    t0 = time.process_time()
    cached = 0
    for seq in seqs:
        if not mgr.can_allocate(seq):
            raise RuntimeError("benchmark pool too small")
        mgr.allocate(seq)
        cached += seq.num_cached_tokens
    out["admit"] = time.process_time() - t0
    steps = []
    for tok in new_tokens:
        t0 = time.process_time()
        for seq in seqs:
            seq.append_token(tok)
            if not mgr.can_append(seq):
                raise RuntimeError("benchmark pool too small")
            mgr.may_append(seq)
        steps.append(time.process_time() - t0)
    out["decode_step"] = float(np.median(steps))
    t0 = time.process_time()
    for seq in seqs:
        mgr.deallocate(seq)
    out["free"] = time.process_time() - t0
    out["hit_rate"] = cached / sum(len(p) for p in prompts)
    return out


def step_rows(num_requests: int, prompt_len: int, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    new_tokens = list(range(7, 7 + DECODE_STEPS))
    for shared in (0.0, 0.5):
        prompts = make_prompts(num_requests, prompt_len, shared, seed=1)
        results: dict[str, list[dict[str, float]]] = {"servekit": [], "nano-vllm-style": []}
        for _ in range(rounds):  # interleaved, one after the other
            for name, fn in (("servekit", run_servekit), ("nano-vllm-style", run_nano)):
                gc.collect()
                results[name].append(fn(prompts, new_tokens))
        for phase, per in (("admit", num_requests), ("decode_step", 1), ("free", num_requests)):
            stats = {n: summary([r[phase] for r in rs]) for n, rs in results.items()}
            unit = "us/request" if per > 1 else f"us/step ({num_requests} reqs)"
            row = {
                "workload": f"{int(shared * 100)}% shared",
                "phase": phase,
                "unit": unit,
                "servekit": stats["servekit"]["median"] / per * 1e6,
                "sk_min": stats["servekit"]["min"] / per * 1e6,
                "sk_max": stats["servekit"]["max"] / per * 1e6,
                "peer": stats["nano-vllm-style"]["median"] / per * 1e6,
                "peer_min": stats["nano-vllm-style"]["min"] / per * 1e6,
                "peer_max": stats["nano-vllm-style"]["max"] / per * 1e6,
            }
            row["speedup"] = row["peer"] / row["servekit"]
            rows.append(row)
        rows.append(
            {
                "workload": f"{int(shared * 100)}% shared",
                "phase": "prefix hit rate",
                "unit": "tokens",
                "servekit": results["servekit"][0]["hit_rate"],
                "peer": results["nano-vllm-style"][0]["hit_rate"],
            }
        )
    return rows


def cpu_measure(fn: Callable[[], None], rounds: int) -> list[float]:
    """Process CPU seconds of ``fn()`` per round (the harness's ``measure`` is wall-clock)."""
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def hashing_rows(num_seqs: int, rounds: int) -> list[dict[str, Any]]:
    prompts = make_prompts(num_seqs, 2048, 0.0, seed=2)
    n_blocks = num_seqs * 2048 // BLOCK

    def ours(algorithm: str) -> Callable[[], None]:
        fn = get_hash_fn(algorithm)

        def run() -> None:
            for p in prompts:
                extend_block_hashes([], p, BLOCK, len(p) // BLOCK, None, fn)

        return run

    def nano() -> None:
        for p in prompts:
            h = -1
            for i in range(len(p) // BLOCK):
                h = NanoBlockManager.compute_hash(p[i * BLOCK : (i + 1) * BLOCK], h)

    rows = []
    for name, fn in (
        ("servekit xxhash", ours("xxhash")),
        ("servekit sha256", ours("sha256")),
        ("nano-vllm-style xxh64", nano),
    ):
        s = summary(cpu_measure(fn, rounds))
        rows.append(
            {
                "hasher": name,
                "Mblocks/s": n_blocks / s["median"] / 1e6,
                "min": n_blocks / s["max"] / 1e6,
                "max": n_blocks / s["min"] / 1e6,
            }
        )
    return rows


def memory_rows(num_blocks: int) -> list[dict[str, Any]]:
    """Python bytes per block with every block cached (tracemalloc)."""
    tokens = np.arange(BLOCK, dtype=np.int32)
    rows = []

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    pool = BlockPool(num_blocks, BLOCK)
    empty = tracemalloc.get_traced_memory()[0] - base
    blocks = pool.allocate(num_blocks)
    link = -1
    register = pool.register
    tok_list = tokens.tolist()
    for b in blocks:  # every block cached, chained, as full sequences leave them
        link = register(b, (b * 0x9E3779B97F4A7C15) & ((1 << 60) - 1), link, list(tok_list))
    pool.free(blocks)
    del blocks
    gc.collect()
    full = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert pool.num_cached == num_blocks
    rows.append(
        {
            "pool": "servekit BlockPool",
            "empty B/block": empty / num_blocks,
            "all cached B/block": full / num_blocks,
        }
    )
    del pool
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    nano = NanoBlockManager(num_blocks)
    empty = tracemalloc.get_traced_memory()[0] - base
    tok_list = tokens.tolist()
    for blk in nano.blocks:
        h = (blk.block_id * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        blk.update(h, list(tok_list))  # nano keeps a per-block list of the block's tokens
        nano.hash_to_block_id[h] = blk.block_id
    gc.collect()
    full = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rows.append(
        {
            "pool": "nano-vllm-style",
            "empty B/block": empty / num_blocks,
            "all cached B/block": full / num_blocks,
        }
    )
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    quick = args.quick
    rounds = args.rounds or (3 if quick else 5)
    num_requests, prompt_len = 512, 2048

    rows = step_rows(num_requests, prompt_len, rounds)
    print_table(
        rows,
        [
            "workload",
            "phase",
            "unit",
            "servekit",
            "sk_min",
            "sk_max",
            "peer",
            "peer_min",
            "peer_max",
            "speedup",
        ],
        title=f"per-step costs: {num_requests} requests x {prompt_len} tokens, block {BLOCK} "
        f"(median of {rounds} rounds; peer = nano-vllm-style BlockManager)",
    )
    hrows = hashing_rows(32 if quick else 128, rounds)
    print_table(
        hrows,
        ["hasher", "Mblocks/s", "min", "max"],
        title="hashing 2,048-token prompts in 16-token blocks",
    )
    mem_blocks = 100_000 if quick else 1_000_000
    mrows = memory_rows(mem_blocks)
    print_table(
        mrows,
        ["pool", "empty B/block", "all cached B/block"],
        title=f"Python memory per block at {mem_blocks:,} blocks (tracemalloc)",
    )

    decode = {r["workload"]: r for r in rows if r["phase"] == "decode_step"}
    bars = {
        "kv_decode_step_speed_vs_peer_512": bar(
            decode["0% shared"]["peer"] / decode["0% shared"]["servekit"], 0.8
        ),
    }
    print_bars(bars)
    write_json(args.json, "kv", rows + hrows + mrows, bars, quick=quick, rounds=rounds)


if __name__ == "__main__":
    main()
