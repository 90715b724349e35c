"""Scheduler + KV manager time per engine step, for any scheduling policy.

A steady state of ``running`` requests (4 tenants, priorities 0-2, 64-token prompts sharing a
32-token prefix, 16 to 256 output tokens): each step is ``schedule()`` then ``update()`` with
one sampled token per sampling request (no model), and every finished request is replaced by a
new one, so admission, prefill chunks, block allocation and frees all happen inside the timed
steps. Reported in microseconds per step (median over rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from random import Random

from servekit.kv.manager import KVCacheManager
from servekit.sched import Request, SamplingParams, Scheduler, SchedulingPolicy

PolicyFactory = Callable[[], SchedulingPolicy]
PREFIX = list(range(1, 33))


def _request(rng: Random, serial: int) -> Request:
    prompt = PREFIX + [rng.randrange(1, 30_000) for _ in range(32)]
    params = SamplingParams(max_tokens=rng.randrange(16, 257), ignore_eos=True)
    return Request(f"r{serial}", prompt, params, priority=serial % 3, tenant=f"t{serial % 4}")


def stepper(factory: PolicyFactory, *, running: int, warmup: int,
            seed: int = 0) -> Callable[[], None]:
    """One engine step (schedule + update, finished requests replaced), warmed up to the
    steady state."""
    rng = Random(seed)
    kv = KVCacheManager(num_blocks=running * 24, block_size=16)
    sched = Scheduler(kv, max_model_len=512, max_num_seqs=running,
                      max_num_batched_tokens=max(2048, running), policy=factory())
    serial = 0
    for _ in range(running):
        sched.add_request(_request(rng, serial))
        serial += 1

    def one_step() -> None:
        nonlocal serial
        out = sched.schedule()
        result = sched.update(out, [7] * out.num_samples)
        for _ in result.finished:
            sched.add_request(_request(rng, serial))
            serial += 1

    for _ in range(warmup):
        one_step()
    return one_step


def us_per_step(step: Callable[[], None], steps: int) -> float:
    """Microseconds per call of ``step`` over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6
