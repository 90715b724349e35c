"""CPU cost of one scheduler step (schedule() + update()) at 64, 512 and 1,024 running requests.

servekit's Scheduler on the real KVCacheManager versus a nano-vllm-style baseline written here
(its Scheduler + BlockManager design: one allocate call per admission that hashes the whole
prompt, one may_append call per running request per step, prefill and decode in separate
steps). Both run the same request stream with 16-token blocks and prefix caching on: each
finished request is replaced by a new one, so the running count stays at N. A fake model
returns one token per sampling request. Scenarios: steady decode at N running, a shared
1,024-token prompt prefix, and KV pressure that forces preemptions.

"speedup" compares CPU per step, "token_speedup" CPU per scheduled token: the baseline runs
prefill-only steps whenever it admits, so its steps carry fewer decodes than servekit's.

servekit's side of the measurement is :mod:`servekit.bench.sched` (``python -m servekit.bench
scheduler --policy NAME`` runs it on a policy plugin beside FCFS).

The bar (DESIGN.md, issue 14): servekit's pure-Python scheduler + KV manager at >= 0.8x the
baseline's speed (baseline us / servekit us) in the decode-512 scenario. Absolute microseconds
are printed but are not a bar: machines of one kind differ 2-4x.
"""

from __future__ import annotations

import statistics
import sys
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bar, parse_args, print_bars, print_table, write_json
from _nano import BLOCK, NanoBlockManager, NanoSeq
from servekit.bench.sched import BLOCK as SERVEKIT_BLOCK
from servekit.bench.sched import TOKEN, run_servekit, timed, workload

if BLOCK != SERVEKIT_BLOCK:
    raise SystemExit("servekit and the nano-vllm-style baseline must use the same block size")


# --------------------------------------------------------------------------- nano-vllm baseline

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
    return timed(step, steps, lambda: len(sched.running), lambda: sched.num_preemptions)


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
        med_tok = {k: statistics.median(s["us_per_token"] for s in v) for k, v in samples.items()}
        for impl, runs in samples.items():
            us = [s["us_per_step"] for s in runs]
            rows.append({
                "scenario": f"{name}-{n}", "impl": impl,
                "us_per_step": statistics.median(us), "min": min(us), "max": max(us),
                "us_per_token": statistics.median(s["us_per_token"] for s in runs),
                "mean_running": statistics.median(s["mean_running"] for s in runs),
                "preemptions": statistics.median(s["preemptions"] for s in runs),
                "speedup": med["nano-vllm"] / med[impl],
                "token_speedup": med_tok["nano-vllm"] / med_tok[impl],
            })
        print(f"  {name}-{n}: servekit {med['servekit']:.1f} us/step, nano-vllm "
              f"{med['nano-vllm']:.1f} us/step: {med['nano-vllm'] / med['servekit']:.2f}x",
              flush=True)

    print_table(rows, ["scenario", "impl", "us_per_step", "min", "max", "us_per_token",
                       "mean_running", "preemptions", "speedup", "token_speedup"],
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
    bars = {"scheduler_speed_vs_nano_vllm_at_512_running": bar(at512["speedup"], 0.8)}
    print_bars(bars)
    write_json(args.json, "scheduler", rows, bars, block_size=BLOCK, rounds=rounds, steps=steps,
               breakdown_decode_512={"us_per_step": total_us, "kv_manager_us_per_step": kv_us,
                                     "scheduler_own_us_per_step": total_us - kv_us})


if __name__ == "__main__":
    main()
