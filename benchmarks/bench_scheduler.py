"""CPU cost of one scheduler step (schedule() + update()) at 64, 512 and 1,024 running requests.

servekit's Scheduler on the real KVCacheManager versus a nano-vllm-style baseline written here
(its Scheduler + BlockManager design: one allocate call per admission that hashes the whole
prompt, one may_append call per running request per step, prefill and decode in separate
steps). Both run the same request stream with 16-token blocks and prefix caching on: each
finished request is replaced by a new one, so the running count stays at N. A fake model
returns one token per sampling request. Scenarios: steady decode at N running, a shared
1,024-token prompt prefix, and KV pressure that forces preemptions.

The bar (DESIGN.md): <= 100 us of CPU per step at 512 running requests.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bar, parse_args, print_bars, print_table, write_json
from servekit.kv.manager import KVCacheManager
from servekit.sched import Request, SamplingParams, Scheduler

BLOCK = 16
TOKEN = 7  # what the fake model samples (no eos: requests end on max_tokens)


# --------------------------------------------------------------------------- workload

def workload(n: int, seed: int, shared_prefix: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt, max_tokens) pairs: prompts 32-256 tokens (after an optional shared
    prefix), outputs 64-512 tokens."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, 32000, shared_prefix).tolist()
    out = []
    for _ in range(n):
        prompt = prefix + rng.integers(1, 32000, int(rng.integers(32, 257))).tolist()
        out.append((prompt, int(rng.integers(64, 513))))
    return out


# --------------------------------------------------------------------------- nano-vllm baseline

class NanoSeq:
    """nano-vllm's Sequence (the fields its scheduler and block manager use)."""

    __slots__ = ("block_table", "ignore_eos", "max_tokens", "num_cached_tokens",
                 "num_prompt_tokens", "num_tokens", "seq_id", "status", "token_ids")

    def __init__(self, seq_id: int, token_ids: list[int], max_tokens: int) -> None:
        self.seq_id = seq_id
        self.token_ids = list(token_ids)
        self.num_tokens = len(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.max_tokens = max_tokens
        self.ignore_eos = True
        self.status = "waiting"

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + BLOCK - 1) // BLOCK

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * BLOCK:(i + 1) * BLOCK]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_tokens += 1


class NanoBlock:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []

    def update(self, h: int, token_ids: list[int]) -> None:
        self.hash = h
        self.token_ids = token_ids

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


class NanoBlockManager:
    """nano-vllm's BlockManager: hashes a prompt's blocks on every allocate."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [NanoBlock(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @staticmethod
    def compute_hash(token_ids: list[int], prefix: int = -1) -> int:
        h = xxhash.xxh64()
        if prefix != -1:
            h.update(prefix.to_bytes(8, "little"))
        h.update(np.array(token_ids).tobytes())
        return h.intdigest()

    def _allocate_block(self, block_id: int) -> NanoBlock:
        block = self.blocks[block_id]
        block.reset()
        self.free_block_ids.remove(block_id)
        self.used_block_ids.add(block_id)
        return block

    def _deallocate_block(self, block_id: int) -> None:
        self.used_block_ids.remove(block_id)
        self.free_block_ids.append(block_id)

    def can_allocate(self, seq: NanoSeq) -> bool:
        return len(self.free_block_ids) >= seq.num_blocks

    def allocate(self, seq: NanoSeq) -> None:
        h = -1
        cache_miss = False
        for i in range(seq.num_blocks):
            token_ids = seq.block(i)
            h = self.compute_hash(token_ids, h) if len(token_ids) == BLOCK else -1
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                cache_miss = True
            if cache_miss:
                block_id = self.free_block_ids[0]
                block = self._allocate_block(block_id)
            else:
                seq.num_cached_tokens += BLOCK
                if block_id in self.used_block_ids:
                    block = self.blocks[block_id]
                    block.ref_count += 1
                else:
                    block = self._allocate_block(block_id)
            if h != -1:
                block.update(h, token_ids)
                self.hash_to_block_id[h] = block_id
            seq.block_table.append(block_id)

    def deallocate(self, seq: NanoSeq) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._deallocate_block(block_id)
        seq.num_cached_tokens = 0
        seq.block_table.clear()

    def can_append(self, seq: NanoSeq) -> bool:
        return len(self.free_block_ids) >= (len(seq) % BLOCK == 1)

    def may_append(self, seq: NanoSeq) -> None:
        block_table = seq.block_table
        last_block = self.blocks[block_table[-1]]
        if len(seq) % BLOCK == 1:
            block_id = self.free_block_ids[0]
            self._allocate_block(block_id)
            block_table.append(block_id)
        elif len(seq) % BLOCK == 0:
            token_ids = seq.block(seq.num_blocks - 1)
            prefix = self.blocks[block_table[-2]].hash if len(block_table) > 1 else -1
            h = self.compute_hash(token_ids, prefix)
            last_block.update(h, token_ids)
            self.hash_to_block_id[h] = last_block.block_id


class NanoScheduler:
    """nano-vllm's Scheduler: a prefill-only step when anything can be admitted, else decode."""

    def __init__(self, num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = NanoBlockManager(num_blocks)
        self.waiting: deque[NanoSeq] = deque()
        self.running: deque[NanoSeq] = deque()
        self.num_preemptions = 0

    def add(self, seq: NanoSeq) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[NanoSeq], bool]:
        scheduled: list[NanoSeq] = []
        num_seqs = 0
        num_batched_tokens = 0
        while self.waiting and num_seqs < self.max_num_seqs:
            seq = self.waiting[0]
            if (num_batched_tokens + len(seq) > self.max_num_batched_tokens
                    or not self.block_manager.can_allocate(seq)):
                break
            num_seqs += 1
            self.block_manager.allocate(seq)
            num_batched_tokens += len(seq) - seq.num_cached_tokens
            seq.status = "running"
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True
        while self.running and num_seqs < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                num_seqs += 1
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def preempt(self, seq: NanoSeq) -> None:
        seq.status = "waiting"
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[NanoSeq], token_ids: list[int]) -> list[NanoSeq]:
        finished = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            seq.append_token(token_id)
            if seq.num_completion_tokens == seq.max_tokens:
                seq.status = "finished"
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished


# --------------------------------------------------------------------------- drivers

class TimedKV(KVCacheManager):
    """The real manager, timing its calls in CPU time (for the breakdown row only)."""

    __slots__ = ("spent",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent = 0.0

    def get_num_cached_tokens(self, seq: Any) -> int:
        t = time.thread_time()
        out = super().get_num_cached_tokens(seq)
        self.spent += time.thread_time() - t
        return out

    def allocate(self, seq: Any, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        t = time.thread_time()
        out = super().allocate(seq, num_tokens, num_cached_tokens)
        self.spent += time.thread_time() - t
        return out

    def commit(self, seq: Any, num_computed_tokens: int) -> None:
        t = time.thread_time()
        super().commit(seq, num_computed_tokens)
        self.spent += time.thread_time() - t

    def free(self, seq: Any) -> None:
        t = time.thread_time()
        super().free(seq)
        self.spent += time.thread_time() - t


def run_servekit(work: list[tuple[list[int], int]], n: int, num_blocks: int, warmup: int,
                 steps: int, timed_kv: bool = False) -> dict[str, float]:
    kv = (TimedKV if timed_kv else KVCacheManager)(num_blocks, BLOCK)
    sched = Scheduler(kv, max_model_len=8192, max_num_seqs=n,
                      max_num_batched_tokens=max(2048, n))
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(work)]
    pending = iter(reqs)
    for _ in range(n):
        sched.add_request(next(pending))

    def step() -> int:
        out = sched.schedule()
        result = sched.update(out, [TOKEN] * out.num_samples)
        for _ in result.finished:
            sched.add_request(next(pending))
        return len(result.requests)

    for _ in range(warmup):
        step()
    if isinstance(kv, TimedKV):
        kv.spent = 0.0
    result = _timed(step, steps, lambda: sched.num_running, lambda: sched.num_preemptions)
    if isinstance(kv, TimedKV):
        result["kv_us_per_step"] = kv.spent / steps * 1e6
    return result


def run_nano(work: list[tuple[list[int], int]], n: int, num_blocks: int, warmup: int,
             steps: int) -> dict[str, float]:
    sched = NanoScheduler(num_blocks, n, max(2048, n))
    seqs = [NanoSeq(i, p, m) for i, (p, m) in enumerate(work)]
    pending = iter(seqs)
    for _ in range(n):
        sched.add(next(pending))

    def step() -> int:
        scheduled, _ = sched.schedule()
        finished = sched.postprocess(scheduled, [TOKEN] * len(scheduled))
        for _ in finished:
            sched.add(next(pending))
        return len(scheduled)

    for _ in range(warmup):
        step()
    return _timed(step, steps, lambda: len(sched.running), lambda: sched.num_preemptions)


def _timed(step: Callable[[], int], steps: int, running: Callable[[], int],
           preemptions: Callable[[], int]) -> dict[str, float]:
    gc.collect()
    p0 = preemptions()
    running_sum = 0
    tokens = 0
    start = time.process_time()
    for _ in range(steps):
        tokens += step()
        running_sum += running()
    cpu = time.process_time() - start
    return {"us_per_step": cpu / steps * 1e6, "us_per_token": cpu / max(tokens, 1) * 1e6,
            "mean_running": running_sum / steps, "preemptions": preemptions() - p0}


# --------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    quick = args.quick
    rounds = args.rounds or (3 if quick else 5)
    steps = 150 if quick else 600
    warmup = 120 if quick else 300
    # (name, running, shared prefix tokens, KV blocks per running request)
    scenarios = [
        ("decode", 64, 0, 40),
        ("decode", 512, 0, 40),
        ("decode", 1024, 0, 40),
        ("shared-prefix", 512, 1024, 110),
        ("kv-pressure", 512, 0, 16),
    ]
    rows: list[dict[str, Any]] = []
    for name, n, prefix, blocks_per_req in scenarios:
        num_blocks = n * blocks_per_req
        samples: dict[str, list[dict[str, float]]] = {"servekit": [], "nano-vllm": []}
        for rnd in range(rounds):
            work = workload(n + 8 * (warmup + steps), seed=rnd, shared_prefix=prefix)
            samples["servekit"].append(run_servekit(work, n, num_blocks, warmup, steps))
            samples["nano-vllm"].append(run_nano(work, n, num_blocks, warmup, steps))
        med = {k: statistics.median(s["us_per_step"] for s in v) for k, v in samples.items()}
        for impl, runs in samples.items():
            us = [s["us_per_step"] for s in runs]
            rows.append({
                "scenario": f"{name}-{n}", "impl": impl,
                "us_per_step": statistics.median(us), "min": min(us), "max": max(us),
                "us_per_token": statistics.median(s["us_per_token"] for s in runs),
                "mean_running": statistics.median(s["mean_running"] for s in runs),
                "preemptions": statistics.median(s["preemptions"] for s in runs),
                "speedup": med["nano-vllm"] / med[impl],
            })
        print(f"  {name}-{n}: servekit {med['servekit']:.1f} us/step, "
              f"nano-vllm {med['nano-vllm']:.1f} us/step", flush=True)

    print_table(rows, ["scenario", "impl", "us_per_step", "min", "max", "us_per_token",
                       "mean_running", "preemptions", "speedup"],
                title=f"CPU us per schedule()+update() step (median of {rounds} rounds, "
                      f"{steps} steps each)")
    # where servekit's time goes at 512 running: the KV manager's calls versus the rest
    split = [run_servekit(workload(520 + 8 * (warmup + steps), seed=r, shared_prefix=0), 512,
                          512 * 40, warmup, steps, timed_kv=True) for r in range(rounds)]
    kv_us = statistics.median(s["kv_us_per_step"] for s in split)
    total_us = statistics.median(s["us_per_step"] for s in split)
    print(f"\ndecode-512 breakdown (timed run): {total_us:.1f} us/step, of which KV manager "
          f"calls {kv_us:.1f} us, scheduler itself {total_us - kv_us:.1f} us")
    at512 = next(r for r in rows if r["scenario"] == "decode-512" and r["impl"] == "servekit")
    bars = {"scheduler_us_per_step_at_512_running": bar(at512["us_per_step"], 100.0,
                                                        higher_is_better=False)}
    print_bars(bars)
    write_json(args.json, "scheduler", rows, bars, block_size=BLOCK, rounds=rounds, steps=steps,
               breakdown_decode_512={"us_per_step": total_us, "kv_manager_us_per_step": kv_us,
                                     "scheduler_own_us_per_step": total_us - kv_us})


if __name__ == "__main__":
    main()
