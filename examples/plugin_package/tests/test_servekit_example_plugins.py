"""The example plugins' own behaviour (the conformance-kit tests sit beside these)."""

from __future__ import annotations

import pytest
from servekit_example_plugins import CacheAffinityPolicy, DeadlinePolicy, TenantTokensHook

from servekit.kv.manager import KVCacheManager
from servekit.metrics import HookSet, RequestFinished
from servekit.route import Candidate, ReplicaLoad, RouteRequest
from servekit.sched import Request, SamplingParams, Scheduler


def test_deadline_policy_serves_the_earliest_deadline_first() -> None:
    kv = KVCacheManager(64, 4)
    clock = [0.0]
    sched = Scheduler(kv, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=8,
                      policy=DeadlinePolicy(default_slack=10.0), clock=lambda: clock[0])
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    sched.add_request(Request("late", [1, 2], params, deadline=50.0))
    sched.add_request(Request("no_deadline", [1, 3], params))  # effective deadline 0 + 10
    sched.add_request(Request("soon", [1, 4], params, deadline=5.0))
    order = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        order += [r.request_id for r in out.requests]
        sched.update(out, [7] * out.num_samples)
    assert order == ["soon", "no_deadline", "late"]
    with pytest.raises(ValueError, match="default_slack"):
        DeadlinePolicy(default_slack=-1)


def test_tenant_tokens_hook_counts_per_tenant() -> None:
    hook = TenantTokensHook()
    hooks = HookSet([hook])
    for tenant, prompt, output in (("a", 5, 3), ("b", 2, 2), ("a", 1, 4)):
        hooks.on_request_finished(RequestFinished(
            "r", tenant, "stop", prompt, output, 0, 0, 0.0, None, None, 1.0))
    assert (hook.totals["a"].requests, hook.totals["a"].prompt_tokens,
            hook.totals["a"].output_tokens) == (2, 6, 7)
    assert hook.totals["b"].output_tokens == 2


def test_cache_affinity_prefers_cached_blocks_then_load_and_avoids_full_caches() -> None:
    policy = CacheAffinityPolicy(load_penalty=1.0, max_kv_usage=0.9)
    request = RouteRequest("k", "t", (1, 2, 3))
    candidates = [
        Candidate("cold", 1.0),
        Candidate("warm", 1.0, cached_blocks=3, in_flight=1),
        Candidate("full", 1.0, cached_blocks=3, load=ReplicaLoad(1, 0, 0.99)),
    ]
    assert policy.choose(request, candidates, 3).nodes == ("warm", "cold", "full")
    busy = [Candidate("cold", 1.0), Candidate("warm", 1.0, cached_blocks=3, in_flight=5)]
    assert policy.choose(request, busy, 1).nodes == ("cold",)


def test_the_router_finds_cache_affinity_by_name() -> None:
    from collections.abc import Sequence

    from servekit.route import Router

    class Index:
        def cached_blocks(self, block_hashes: Sequence[int]) -> dict[str, int]:
            return {"b": len(block_hashes)}

    router = Router(["a", "b", "c"], policy='cache_affinity:{"load_penalty": 0.5}',
                    index=Index(), num_fallbacks=2)
    assert isinstance(router.policy, CacheAffinityPolicy) and router.policy.load_penalty == 0.5
    route = router.route(session_id="s", block_hashes=[11, 12])
    assert route.node == "b" and set(route.fallbacks) == {"a", "c"}
