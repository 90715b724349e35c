"""Stateful property tests: random arrivals, aborts and tight KV budgets against a fake model.

Invariants checked after every step: budgets, a consistent partition of requests into waiting,
running and finished, block tables that cover what runs, and the KV each step reads (checked by
the fake model). At teardown every request finishes, every block is free, and every request's
output equals what the model generates for it alone: so outputs are identical with and without
preemption, chunking and prefix caching.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servekit.kv.manager import KVCacheManager
from servekit.sched import (
    FairSharePolicy,
    FinishReason,
    PriorityPolicy,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
)
from tests.sched.sched_fakes import EOS, FakeModel, drain, reference_output, step

MAX_MODEL_LEN = 40
PREFIXES = ([], [5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11, 12], [3, 1, 4, 1, 5, 9, 2, 6, 5])


class SchedulerMachine(RuleBasedStateMachine):
    policy_name = "fcfs"
    prefix_caching = True

    def __init__(self) -> None:
        super().__init__()
        self.time = 0.0
        self.kv = KVCacheManager(num_blocks=8, block_size=4,
                                 enable_prefix_caching=self.prefix_caching)
        policy = {"fcfs": None, "priority": PriorityPolicy(aging_rate=0.5),
                  "fair": FairSharePolicy({"a": 2.0})}[self.policy_name]
        self.sched = Scheduler(
            self.kv, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_num_batched_tokens=12,
            max_prefill_chunk=6, policy=policy, eos_token_ids=[EOS], clock=lambda: self.time,
        )
        self.model = FakeModel(self.kv)
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.next_id = 0
        self.preemptions_seen = 0

    @rule(prefix=st.sampled_from(PREFIXES),
          suffix=st.lists(st.integers(1, 22), min_size=1, max_size=8),
          max_tokens=st.integers(1, 12), min_tokens=st.integers(0, 2),
          ignore_eos=st.booleans(), stop=st.sampled_from([(), (7,), (3, 11)]),
          priority=st.integers(0, 2), tenant=st.sampled_from(["a", "b", "c"]))
    def add(self, prefix: list[int], suffix: list[int], max_tokens: int, min_tokens: int,
            ignore_eos: bool, stop: tuple[int, ...], priority: int, tenant: str) -> None:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                                ignore_eos=ignore_eos, stop_token_ids=stop)
        rid = f"r{self.next_id}"
        self.next_id += 1
        req = Request(rid, prefix + suffix, params, priority=priority, tenant=tenant)
        self.sched.add_request(req)
        self.requests[rid] = req

    @rule(steps=st.integers(1, 4))
    def run_steps(self, steps: int) -> None:
        for _ in range(steps):
            computed = {r.request_id: r.num_computed_tokens for r in self.sched.running()}
            out, result = step(self.sched, self.model)
            self.time += 0.1
            self.preemptions_seen += len(out.preempted)
            for r in out.preempted:
                assert r.status is RequestStatus.PREEMPTED
                assert r.block_ids == [] and r.num_computed_tokens == 0
                if self.prefix_caching:  # hashes are kept, so a recompute never re-hashes
                    assert len(r.block_hashes) >= computed[r.request_id] // self.kv.block_size
            if out.preempted and self.policy_name != "priority":
                # a step that preempted for KV admits nobody new (priority preempts to admit)
                assert all(r.request_id in computed for r in out.requests)
            assert len(result.requests) == len(result.new_token_ids) == out.num_samples
            for r in result.finished:
                assert r.status is RequestStatus.FINISHED and r.block_ids == []

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        req = self.requests[rid]
        was_finished = req.finished
        assert self.sched.abort(rid) is (not was_finished)
        assert self.sched.abort(rid) is False  # idempotent
        if not was_finished:
            self.aborted.add(rid)
            assert req.finish_reason is FinishReason.ABORT and req.block_ids == []

    @invariant()
    def partition(self) -> None:
        sched = self.sched
        running = sched.running()
        waiting = list(sched.policy)
        assert len(running) <= sched.max_num_seqs
        ids = [r.request_id for r in running + waiting]
        assert len(ids) == len(set(ids)), "a request is both waiting and running, or twice"
        unfinished = {rid for rid, r in self.requests.items() if not r.finished}
        assert set(ids) == unfinished, "a request was lost or resurrected"
        for r in running:
            assert r.status is RequestStatus.RUNNING
            assert len(r.block_ids) * self.kv.block_size >= r.num_computed_tokens
        for r in waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.block_ids == []
        held = {b for r in running for b in r.block_ids}
        assert self.kv.num_free_blocks + len(held) == self.kv.num_blocks
        assert sched.waiting_tokens == sum(len(r.token_ids) for r in waiting)

    def teardown(self) -> None:
        drain(self.sched, self.model)
        assert self.kv.num_free_blocks == self.kv.num_blocks, "blocks leaked"
        assert self.kv.num_sequences == 0
        for rid, req in self.requests.items():
            assert req.finished
            expected = reference_output(req.prompt_token_ids, req.params, MAX_MODEL_LEN)
            if rid in self.aborted:
                assert expected[: req.num_output_tokens] == req.output_token_ids
            else:
                assert req.output_token_ids == expected, rid
                last = req.output_token_ids[-1]
                stopped = last in req.stop_ids and req.num_output_tokens >= req.params.min_tokens
                assert req.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH)


SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None)


class FCFSMachine(SchedulerMachine):
    pass


class NoPrefixCacheMachine(SchedulerMachine):
    prefix_caching = False


class PriorityMachine(SchedulerMachine):
    policy_name = "priority"


class FairMachine(SchedulerMachine):
    policy_name = "fair"


TestFCFS = SETTINGS(FCFSMachine).TestCase
TestNoPrefixCache = SETTINGS(NoPrefixCacheMachine).TestCase
TestPriority = SETTINGS(PriorityMachine).TestCase
TestFair = SETTINGS(FairMachine).TestCase
