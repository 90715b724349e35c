"""Serve a workload through the real parts (limiter, router, scheduler, KV manager) on the
fake model and a fake clock, checking that serving itself stayed correct."""

from __future__ import annotations

from collections.abc import Sequence

from servekit.kv.manager import KVCacheManager
from servekit.limit import Limit, Limiter
from servekit.metrics.hooks import HookSet
from servekit.route import Router
from servekit.sched import Request, Scheduler
from servekit.testing._check import check
from servekit.testing.clock import FakeClock
from servekit.testing.fake_model import EOS, FakeModel, reference_output, step
from servekit.testing.strategies import RequestSpec, to_request

MAX_MODEL_LEN = 40
STEP_SECONDS = 0.05


def serve(specs: Sequence[RequestSpec], hooks: HookSet, *, max_steps: int = 5_000,
          invariant: str = "serving is unaffected by hooks") -> dict[str, Request]:
    """Run ``specs`` to completion with ``hooks`` on every part; returns the requests.

    Any exception escaping a part, a leaked block, or an output that differs from the
    request's output alone fails with ``invariant``.
    """
    clock = FakeClock()
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_model_len=MAX_MODEL_LEN, max_num_seqs=4,
                      max_num_batched_tokens=16, max_prefill_chunk=8, eos_token_ids=[EOS],
                      clock=clock, hooks=hooks)
    limiter = Limiter([Limit("requests", 1000, 100.0)], clock=clock, hooks=hooks)
    router = Router(["replica-0", "replica-1"], clock=clock, hooks=hooks)
    model = FakeModel(kv)
    pending = sorted(enumerate(specs), key=lambda item: item[1].arrival)
    requests: dict[str, Request] = {}
    aborts: list[tuple[float, str]] = []
    aborted: set[str] = set()
    try:
        for _ in range(max_steps):
            now = clock()
            while pending and pending[0][1].arrival <= now:
                i, spec = pending.pop(0)
                rid = f"r{i}"
                limiter.try_acquire(spec.tenant or "anonymous")
                router.release(router.route(session_id=rid).node)
                requests[rid] = to_request(spec, rid)
                sched.add_request(requests[rid])
                if spec.abort_after is not None:
                    aborts.append((now + spec.abort_after, rid))
            for due, rid in [a for a in aborts if a[0] <= now]:
                aborts.remove((due, rid))
                if sched.abort(rid):
                    aborted.add(rid)
            if not pending and not sched.has_unfinished_requests():
                break
            if sched.has_unfinished_requests():
                step(sched, model)
            clock.advance(STEP_SECONDS)
    except AssertionError:
        raise
    except Exception as exc:
        check(False, invariant, f"serving raised {exc!r}")
    check(not pending and not sched.has_unfinished_requests(), invariant,
          f"requests unfinished after {max_steps} steps")
    check(kv.num_free_blocks == kv.num_blocks, invariant,
          f"{kv.num_blocks - kv.num_free_blocks} KV blocks leaked")
    for rid, req in requests.items():
        expected = reference_output(req.prompt_token_ids, req.params, MAX_MODEL_LEN)
        got = req.output_token_ids
        ok = expected[: len(got)] == got if rid in aborted else got == expected
        check(ok, invariant, f"{rid}: output {got}, alone {expected}")
    return requests
