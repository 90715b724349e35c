"""CPU cost of one scheduler step (``schedule()`` + ``update()``) on the real KV manager.

A request stream of 32-256-token prompts (after an optional shared prefix) and 64-512 output
tokens, 16-token blocks, prefix caching on: each finished request is replaced by a new one,
so the running count stays at ``n``; a fake model returns one token per sampling request.
:data:`SCENARIOS` are steady decode, a shared 1,024-token prefix, and KV pressure that forces
preemptions. With ``mixed=True`` requests carry 4 tenants and priorities 0-2, so tenant- and
priority-aware policies have something to order. Times are this process's CPU time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from servekit.kv.manager import KVCacheManager
from servekit.sched import Request, SamplingParams, Scheduler, SchedulingPolicy

BLOCK = 16
TOKEN = 7  # what the fake model samples (no eos: requests end on max_tokens)
#: (name, shared prefix tokens, KV blocks per running request)
SCENARIOS: tuple[tuple[str, int, int], ...] = (
    ("decode", 0, 40),
    ("shared-prefix", 1024, 110),
    ("kv-pressure", 0, 16),
)
Work = list[tuple[list[int], int]]


def workload(n: int, seed: int, shared_prefix: int) -> Work:
    """``n`` (prompt, max_tokens) pairs: prompts 32-256 tokens (after an optional shared
    prefix), outputs 64-512 tokens."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, 32000, shared_prefix).tolist()
    out = []
    for _ in range(n):
        prompt = prefix + rng.integers(1, 32000, int(rng.integers(32, 257))).tolist()
        out.append((prompt, int(rng.integers(64, 513))))
    return out


class TimedKV(KVCacheManager):
    """The real manager, timing its calls in CPU time (for a breakdown of a step)."""

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


def run_servekit(work: Work, n: int, num_blocks: int, warmup: int, steps: int, *,
                 timed_kv: bool = False, policy: str | SchedulingPolicy | None = None,
                 mixed: bool = False) -> dict[str, float]:
    """Steps of servekit's scheduler at ``n`` running with ``policy`` (default FCFS)."""
    kv = (TimedKV if timed_kv else KVCacheManager)(num_blocks, BLOCK)
    sched = Scheduler(kv, max_model_len=8192, max_num_seqs=n,
                      max_num_batched_tokens=max(2048, n), policy=policy)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True),
                    priority=i % 3 if mixed else 0, tenant=f"t{i % 4}" if mixed else None)
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
    result = timed(step, steps, lambda: sched.num_running, lambda: sched.num_preemptions)
    if isinstance(kv, TimedKV):
        result["kv_us_per_step"] = kv.spent / steps * 1e6
    return result


def timed(step: Callable[[], int], steps: int, running: Callable[[], int],
          preemptions: Callable[[], int]) -> dict[str, float]:
    """CPU per step and per scheduled token, mean running, preemptions over ``steps`` steps
    (``step()`` returns the tokens it scheduled)."""
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
