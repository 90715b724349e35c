"""The real scheduler and KV cache manager reporting through the hooks, on a fake clock."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from servekit.kv import KVCacheManager
from servekit.metrics import Hook, HookSet, PrometheusHook, RequestFinished, StatsHook
from servekit.sched import Request, SamplingParams, Scheduler


class Finished(Hook):
    def __init__(self) -> None:
        self.events: list[RequestFinished] = []

    def on_request_finished(self, event: RequestFinished) -> None:
        self.events.append(event)


def test_scheduler_and_kv_events_reach_the_exporters() -> None:
    now = [0.0]
    stats, prom, finished = StatsHook(), PrometheusHook("m"), Finished()
    hooks = HookSet([stats, prom, finished])
    kv = KVCacheManager(14, 4, on_event=hooks.on_kv_event)
    sched = Scheduler(kv, max_model_len=64, max_num_seqs=4, hooks=hooks, clock=lambda: now[0])
    prefix = list(range(1, 9))  # two shared full blocks
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i in range(6):
        sched.add_request(Request(f"r{i}", [*prefix, 100 + i, 200 + i], params, tenant=f"t{i % 2}"))
    steps = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        now[0] += 0.01
        sched.update(out, [7] * out.num_samples)
        steps += 1
        assert steps < 500

    assert stats.finish_reasons == {"length": 6}
    assert stats.open_requests == set()
    assert stats.counter("generation_tokens") == 6 * 8
    assert stats.histogram("time_to_first_token_seconds").count == 6
    assert stats.histogram("request_queue_time_seconds").count == 6
    assert stats.histogram("inter_token_latency_seconds").count == 6 * 7
    preemptions = sum(e.num_preemptions for e in finished.events)
    assert stats.counter("num_preemptions") == preemptions > 0  # 14 blocks are too few
    assert 0 < stats.prefix_cache_hit_rate <= 1
    assert stats.counter("kv_blocks_stored") > 0
    for e in finished.events:  # timings are ordered on the scheduler's clock
        assert e.first_scheduled_time is not None and e.first_token_time is not None
        assert e.arrival_time <= e.first_scheduled_time < e.first_token_time <= e.time
        assert e.output_tokens == 8 and e.prompt_tokens == 10

    families = {f.name: f for f in text_string_to_metric_families(prom.render().decode())}
    generated = {
        s.labels["tenant"]: s.value for s in families["servekit_generation_tokens"].samples
    }
    assert generated == {"t0": 24, "t1": 24}
    hits = families["servekit_prefix_cache_hits"].samples[0].value
    assert hits == stats.counter("prefix_cache_hits") > 0
