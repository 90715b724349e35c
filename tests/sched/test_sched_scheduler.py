"""Scheduler behaviour: budgets, chunking, prefix hits, stopping rules, aborts, preemption,
queue bounds, deadlines, events and bad input."""

from __future__ import annotations

from typing import Any

import pytest

from servekit.kv.manager import KVCacheManager
from servekit.metrics.hooks import Hook, HookSet
from servekit.sched import (
    FinishReason,
    InvalidParameterError,
    PriorityPolicy,
    QueueFullError,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
)
from servekit.sched.errors import DuplicateRequestError, SchedulerStateError, UnknownRequestError
from tests.sched.sched_fakes import EOS, FakeModel, drain, next_token, reference_output, step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(num_blocks: int = 64, block_size: int = 4, prefix_caching: bool = True,
         **kwargs: Any) -> tuple[Scheduler, KVCacheManager, FakeModel]:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    kwargs.setdefault("max_model_len", 64)
    kwargs.setdefault("eos_token_ids", [EOS])
    sched = Scheduler(kv, **kwargs)
    return sched, kv, FakeModel(kv)


def req(rid: str, prompt: list[int], max_tokens: int = 8, **kwargs: Any) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=kwargs.pop("ignore_eos", True),
                            **{k: kwargs.pop(k) for k in ("min_tokens", "stop_token_ids")
                               if k in kwargs})
    return Request(rid, prompt, params, **kwargs)


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors() -> None:
    sched, _, _ = make(max_model_len=16)
    with pytest.raises(InvalidParameterError) as e:
        Request("a", [])
    assert e.value.param == "prompt_token_ids"
    with pytest.raises(InvalidParameterError) as e:
        Request("a", [1, -2])
    assert e.value.param == "prompt_token_ids"
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(req("long", list(range(1, 17))))
    assert e.value.param == "prompt_token_ids" and "max_model_len 16" in str(e.value)
    with pytest.raises(UnknownRequestError, match="'nope'") as e2:
        sched.abort("nope")
    assert isinstance(e2.value, KeyError)
    sched.add_request(req("a", [1, 2]))
    with pytest.raises(DuplicateRequestError):
        sched.add_request(req("a", [1, 2]))
    with pytest.raises(InvalidParameterError) as e:
        Scheduler(KVCacheManager(8, 4), max_model_len=16, max_num_seqs=8,
                  max_num_batched_tokens=4)
    assert e.value.param == "max_num_batched_tokens"


def test_request_that_can_never_fit_the_cache_is_rejected() -> None:
    sched, _, _ = make(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(req("a", [1] * 10, max_tokens=20))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(req("b", [1] * 20, max_tokens=1))
    assert e.value.param == "prompt_token_ids"


def test_driving_out_of_order_is_an_error() -> None:
    sched, _, model = make()
    sched.add_request(req("a", [1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(SchedulerStateError):
        sched.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids"):
        sched.update(out, [])
    sched.update(out, model.run(out))
    with pytest.raises(SchedulerStateError):
        sched.update(out, [1])


def test_queue_bounds_raise_queue_full_with_retry_after() -> None:
    sched, _, _ = make(max_waiting_requests=2, max_waiting_tokens=10, retry_after=2.5,
                       max_num_seqs=1)
    sched.add_request(req("z", [1]))  # takes the one free running slot at the next step
    sched.add_request(req("a", [1] * 4))
    sched.add_request(req("b", [1] * 4))
    with pytest.raises(QueueFullError) as e:
        sched.add_request(req("c", [1]))
    assert e.value.limit == "max_waiting_requests" and e.value.retry_after == 2.5
    sched.abort("b")
    with pytest.raises(QueueFullError) as e:
        sched.add_request(req("c", [1] * 7))
    assert e.value.limit == "max_waiting_tokens"
    sched.add_request(req("c", [1] * 5))  # exactly at the bound (z's token counts too)
    big, _, _ = make(max_waiting_tokens=4)
    big.add_request(req("huge", [1] * 30))  # an empty queue always accepts


def test_a_burst_into_an_idle_scheduler_fills_running_slots_and_the_waiting_bound() -> None:
    sched, _, model = make(max_waiting_requests=2, max_num_seqs=3)
    for i in range(5):  # 3 free running slots + 2 waiting
        sched.add_request(req(f"r{i}", [1, 2]))
    with pytest.raises(QueueFullError):
        sched.add_request(req("r5", [1, 2]))
    step(sched, model)  # three start running; two still wait, at the bound
    assert sched.num_running == 3
    with pytest.raises(QueueFullError):
        sched.add_request(req("r5", [1, 2]))


# ---------------------------------------------------------------- batching


def test_chunked_prefill_never_starves_decodes() -> None:
    sched, _, model = make(num_blocks=64, max_num_batched_tokens=8, max_prefill_chunk=5,
                           max_model_len=128)
    sched.add_request(req("short", [1, 2], max_tokens=20))
    step(sched, model)  # short prefills and samples
    sched.add_request(req("long", list(range(1, 31)), max_tokens=2))
    chunks = []
    while sched.get_request("long").prefilling:
        out, _ = step(sched, model)
        assert out.requests[0].request_id == "short" and out.num_decodes == 1
        i = out.requests.index(sched.get_request("long"))
        chunks.append((out.num_computed_tokens[i], out.num_new_tokens[i], out.samples[i]))
    assert chunks == [(0, 5, False), (5, 5, False), (10, 5, False), (15, 5, False),
                      (20, 5, False), (25, 5, True)]


def test_several_partial_prefills_share_a_step_within_budget() -> None:
    sched, _, model = make(num_blocks=64, max_num_batched_tokens=10, max_prefill_chunk=4,
                           max_model_len=128)
    for i in range(3):
        sched.add_request(req(f"p{i}", [i + 1] * 9, max_tokens=1))
    out, _ = step(sched, model)
    assert out.num_new_tokens == [4, 4, 2] and out.samples == [False, False, False]
    assert out.total_num_tokens == 10


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    sched, kv, model = make(block_size=4)
    shared = [9, 8, 7, 6, 5, 4, 3, 2]
    sched.add_request(req("a", [*shared, 1], max_tokens=2))
    drain(sched, model)
    sched.add_request(req("b", [*shared, 11, 12], max_tokens=2))
    out, _ = step(sched, model)
    assert out.num_computed_tokens == [8] and out.num_new_tokens == [2]
    assert sched.get_request("b").num_cached_tokens == 8
    drain(sched, model)
    assert kv.num_free_blocks == kv.num_blocks


# ---------------------------------------------------------------- stopping


def test_finish_reasons_and_outputs_match_the_model() -> None:
    sched, _, model = make(max_model_len=12)
    prompt = [3, 4, 5]
    free_run = reference_output(prompt, SamplingParams(max_tokens=50, ignore_eos=True), 200)
    first = free_run[0]
    specs = {
        "length": SamplingParams(max_tokens=3, ignore_eos=True),
        "model_len": SamplingParams(max_tokens=50, ignore_eos=True),
        "stop_token": SamplingParams(max_tokens=50, ignore_eos=True, stop_token_ids=[first]),
        "min_tokens": SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[first],
                                     min_tokens=2),
    }
    reqs = {rid: Request(rid, prompt, p) for rid, p in specs.items()}
    for r in reqs.values():
        sched.add_request(r)
    drain(sched, model)
    assert reqs["length"].output_token_ids == free_run[:3]
    assert reqs["length"].finish_reason is FinishReason.LENGTH
    assert reqs["model_len"].num_tokens == 12
    assert reqs["model_len"].finish_reason is FinishReason.LENGTH
    assert reqs["stop_token"].output_token_ids == [first]
    assert reqs["stop_token"].finish_reason is FinishReason.STOP
    # the stop token in first position is ignored before min_tokens
    assert reqs["min_tokens"].num_output_tokens >= 2
    assert reqs["min_tokens"].output_token_ids[0] == first


def test_eos_stops_unless_ignored() -> None:
    # find a prompt whose first generated token is EOS
    prompt = next([a, b] for a in range(1, 23) for b in range(1, 23)
                  if next_token([a, b]) == EOS)
    sched, _, model = make()
    stop = req("stop", prompt, max_tokens=5, ignore_eos=False)
    keep = req("keep", prompt, max_tokens=5, ignore_eos=True)
    sched.add_request(stop)
    sched.add_request(keep)
    drain(sched, model)
    assert stop.output_token_ids == [EOS] and stop.finish_reason is FinishReason.STOP
    assert keep.num_output_tokens == 5 and keep.finish_reason is FinishReason.LENGTH


# ---------------------------------------------------------------- abort and errors


def test_abort_in_every_state_frees_everything() -> None:
    sched, kv, model = make(num_blocks=16, max_num_batched_tokens=6, max_prefill_chunk=3,
                            max_num_seqs=3)
    sched.add_request(req("running", [1, 2], max_tokens=30))
    step(sched, model)
    sched.add_request(req("prefilling", list(range(1, 11)), max_tokens=30))
    sched.add_request(req("x", [5, 5], max_tokens=30))
    sched.add_request(req("waiting", [7, 7], max_tokens=30))
    step(sched, model)
    assert sched.get_request("prefilling").prefilling
    assert sched.get_request("waiting").status is RequestStatus.WAITING
    for rid in ("running", "prefilling", "waiting"):
        r = sched.get_request(rid)
        assert sched.abort(rid) is True
        assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
        assert r.block_ids == []
        assert sched.abort(rid) is False
    drain(sched, model)
    assert kv.num_free_blocks == kv.num_blocks and kv.num_sequences == 0
    assert sched.num_waiting == 0 and sched.waiting_tokens == 0


def test_abort_between_schedule_and_update_drops_its_token() -> None:
    sched, kv, _ = make()
    a = req("a", [1, 2, 3])
    b = req("b", [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sampled = [10, 11]  # one per sampling entry, in batch order
    assert sched.abort("a") is True
    assert sched.finish_with_error("b", "NaN logits") is True
    result = sched.update(out, sampled)
    assert result.requests == [] and a.num_output_tokens == 0
    assert b.finish_reason is FinishReason.ERROR and b.error == "NaN logits"
    assert kv.num_free_blocks == kv.num_blocks


def test_engine_can_finish_on_a_stop_string() -> None:
    sched, kv, model = make()
    r = req("a", [1, 2], max_tokens=10)
    sched.add_request(r)
    step(sched, model)
    assert sched.finish("a", "stop") is True
    assert r.finish_reason is FinishReason.STOP and kv.num_free_blocks == kv.num_blocks


def test_deadline_aborts_a_request_wherever_it_is() -> None:
    clock = Clock()
    sched, kv, model = make(clock=clock, max_num_seqs=1, max_num_batched_tokens=4)
    slow = req("slow", [1, 2], max_tokens=30, deadline=1.0)
    queued = req("queued", [3, 4], max_tokens=30, deadline=0.5)
    sched.add_request(slow)
    sched.add_request(queued)
    step(sched, model)
    clock.now = 0.6
    out, result = step(sched, model)
    assert out.finished == [queued] and result.finished == [queued]
    assert queued.finish_reason is FinishReason.ABORT and queued.error == "deadline exceeded"
    clock.now = 1.0
    out, result = step(sched, model)
    assert out.finished == [slow] and out.requests == []
    assert kv.num_free_blocks == kv.num_blocks


# ---------------------------------------------------------------- preemption


def test_preemption_by_recompute_keeps_outputs_identical() -> None:
    # 6 blocks of 4 tokens: three requests growing to 20 tokens cannot all fit
    sched, kv, model = make(num_blocks=6, block_size=4, max_num_seqs=3)
    reqs = [req(f"r{i}", [i + 1, i + 2, i + 3, i + 4, i + 5], max_tokens=15) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    preempted = []
    admitted_in_preempting_step = []
    while sched.has_unfinished_requests():
        before = {r.request_id for r in sched.running()}
        out, _ = step(sched, model)
        preempted += out.preempted
        if out.preempted:
            admitted_in_preempting_step += [r for r in out.requests if r.request_id not in before]
            victim = out.preempted[0]
            assert victim.status is RequestStatus.PREEMPTED
            assert sched.policy.peek() is victim  # front of the queue
    assert preempted, "the scenario must preempt"
    assert admitted_in_preempting_step == []
    assert reqs[2].num_preemptions >= 1  # FCFS: the request admitted last is the victim
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.params, 64)
    assert kv.num_free_blocks == kv.num_blocks


def test_priority_preempts_lower_priority_and_aging_prevents_starvation() -> None:
    clock = Clock()
    sched, kv, model = make(num_blocks=32, max_num_seqs=1, max_num_batched_tokens=8,
                            clock=clock, policy=PriorityPolicy(aging_rate=1.0))
    low = req("low", [1, 2, 3], max_tokens=20, priority=5)
    sched.add_request(low)
    step(sched, model)
    clock.now = 1.0
    high = req("high", [4, 5, 6], max_tokens=3, priority=0)
    sched.add_request(high)
    out, _ = step(sched, model)
    assert out.preempted == [low] and out.requests == [high]
    drain_steps = 0
    # a stream of fresh high-priority requests: aging lets `low` run once it waited long enough
    while low.status is not RequestStatus.FINISHED and drain_steps < 200:
        clock.now += 0.5
        if sched.num_waiting < 3:
            sched.add_request(req(f"h{drain_steps}", [4, 5, 6], max_tokens=3, priority=0))
        step(sched, model)
        drain_steps += 1
    assert low.finished and low.finish_reason is FinishReason.LENGTH
    assert low.output_token_ids == reference_output([1, 2, 3], low.params, 64)
    drain(sched, model)
    assert kv.num_free_blocks == kv.num_blocks


# ---------------------------------------------------------------- events


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_request_queued(self, event: Any) -> None:
        self.events.append(("queued", event))

    def on_request_scheduled(self, event: Any) -> None:
        self.events.append(("scheduled", event))

    def on_request_preempted(self, event: Any) -> None:
        self.events.append(("preempted", event))

    def on_first_token(self, event: Any) -> None:
        self.events.append(("first", event))

    def on_new_tokens(self, event: Any) -> None:
        self.events.append(("new", event))

    def on_request_finished(self, event: Any) -> None:
        self.events.append(("finished", event))

    def on_cache_stats(self, event: Any) -> None:
        self.events.append(("cache", event))


def test_events_carry_clock_times() -> None:
    clock = Clock()
    rec = Recorder()
    sched, _, model = make(clock=clock, hooks=HookSet([rec]))
    sched.add_request(req("a", [1, 2, 3], max_tokens=3, tenant="t"))
    for t in (1.0, 2.0, 3.0):
        clock.now = t
        step(sched, model)
    kinds = [k for k, _ in rec.events if k != "cache"]
    assert kinds == ["queued", "scheduled", "first", "new", "new", "finished"]
    ev = dict(rec.events)
    assert ev["queued"].time == 0.0 and ev["queued"].prompt_tokens == 3
    assert ev["scheduled"].time == 1.0 and ev["scheduled"].tenant == "t"
    assert ev["first"].time == 1.0
    news = [e for k, e in rec.events if k == "new"]
    assert [(e.previous_time, e.time, e.num_tokens) for e in news] == [(1.0, 2.0, 1), (2.0, 3.0, 1)]
    fin = ev["finished"]
    assert (fin.reason, fin.output_tokens, fin.first_token_time, fin.time) == ("length", 3, 1.0, 3.0)
    assert sum(1 for k, _ in rec.events if k == "cache") == 3


def test_no_listener_no_event_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    import servekit.sched.scheduler as mod

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("event built without a listener")

    for name in ("RequestQueued", "RequestScheduled", "FirstToken", "NewTokens",
                 "RequestFinished", "RequestPreempted", "CacheStats"):
        monkeypatch.setattr(mod, name, boom)
    sched, _, model = make(num_blocks=6, max_num_seqs=3)
    for i in range(3):
        sched.add_request(req(f"r{i}", [i + 1] * 5, max_tokens=15))
    drain(sched, model)
    assert sched.num_preemptions > 0


# ---------------------------------------------------------------- admission


def test_prompts_that_fill_the_pool_exactly_are_admitted_together() -> None:
    # 6 blocks of 4 tokens, three 5-token prompts: 2 blocks each fills the pool exactly
    sched, kv, model = make(num_blocks=6, block_size=4, max_num_seqs=3)
    reqs = [req(f"r{i}", [i + 1] * 5, max_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched, model)
    assert out.requests == reqs
    assert [len(r.block_ids) for r in reqs] == [2, 2, 2]
    drain(sched, model)
    assert kv.num_free_blocks == kv.num_blocks


def test_blocks_filled_while_decoding_become_hittable_when_the_request_ends() -> None:
    sched, kv, model = make(num_blocks=32, block_size=4)
    a = req("a", [3, 1, 4, 1], max_tokens=9)
    sched.add_request(a)
    drain(sched, model)
    # a's 13 tokens fill 3 blocks: its prompt block and two written while decoding
    follow_up = req("b", [*a.token_ids, 5], max_tokens=1)
    sched.add_request(follow_up)
    out, _ = step(sched, model)
    assert out.num_computed_tokens == [12] and follow_up.num_cached_tokens == 12
    drain(sched, model)
    assert kv.num_free_blocks == kv.num_blocks
