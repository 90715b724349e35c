"""The scheduling-policy kit: the real scheduler and KV manager, driven with your policy.

:class:`SchedulerMachine` is a hypothesis state machine: random arrivals (shared prefixes,
tenants, priorities, stop rules), aborts and steps on a tight KV budget, against the fake model
of :mod:`servekit.testing.fake_model`, which reads every token back through the block table.
After every step: budgets respected, no request lost or duplicated, waiting and running a
partition of the unfinished requests, blocks conserved. At teardown: every request finishes or
is aborted, every block is free, and every output equals the request's output run alone.

:class:`SchedulingPolicyContract` runs the machine and :func:`check_starvation` for a policy
factory::

    class TestMyPolicy(SchedulingPolicyContract):
        policy_factory = MyPolicy
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from random import Random
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servekit.kv.manager import KVCacheManager
from servekit.sched import (
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulingPolicy,
)
from servekit.sched.policy import VictimPolicy
from servekit.testing._check import check, check_interface
from servekit.testing._run import run_machine
from servekit.testing.clock import FakeClock
from servekit.testing.fake_model import EOS, FakeModel, drain, reference_output, step
from servekit.testing.strategies import RequestSpec, request_specs, to_request

_QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
PolicyFactory = Callable[[], SchedulingPolicy | None]
VictimFactory = Callable[[], VictimPolicy | None]


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, aborts and steps against the real scheduler with ``policy_factory()``.

    Subclass and set the class attributes to configure it; ``policy_factory`` returning None
    means the scheduler's default policy.
    """

    policy_factory: ClassVar[PolicyFactory] = lambda: None
    victim_policy_factory: ClassVar[VictimFactory] = lambda: None
    prefix_caching: ClassVar[bool] = True
    num_blocks: ClassVar[int] = 8
    block_size: ClassVar[int] = 4
    max_model_len: ClassVar[int] = 40
    max_num_seqs: ClassVar[int] = 4
    max_num_batched_tokens: ClassVar[int] = 12
    max_prefill_chunk: ClassVar[int] = 6
    step_seconds: ClassVar[float] = 0.1
    #: extra keyword arguments of KVCacheManager and Scheduler
    kv_kwargs: ClassVar[Mapping[str, Any]] = {}
    scheduler_kwargs: ClassVar[Mapping[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        self.clock = FakeClock()
        self.kv = KVCacheManager(num_blocks=cls.num_blocks, block_size=cls.block_size,
                                 enable_prefix_caching=cls.prefix_caching, **cls.kv_kwargs)
        self.sched = Scheduler(
            self.kv, max_model_len=cls.max_model_len, max_num_seqs=cls.max_num_seqs,
            max_num_batched_tokens=cls.max_num_batched_tokens,
            max_prefill_chunk=cls.max_prefill_chunk, policy=cls.policy_factory(),
            victim_policy=cls.victim_policy_factory(), eos_token_ids=[EOS], clock=self.clock,
            **cls.scheduler_kwargs,
        )
        self.preempts_to_admit = bool(getattr(self.sched.policy, "preempts_for_waiting", False))
        self.model = FakeModel(self.kv)
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.next_id = 0
        self.preemptions_seen = 0

    @rule(spec=request_specs(abort_probability=0.0))
    def add(self, spec: RequestSpec) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        req = to_request(spec, rid)
        self.sched.add_request(req)
        self.requests[rid] = req

    @rule(steps=st.integers(1, 4))
    def run_steps(self, steps: int) -> None:
        for _ in range(steps):
            computed = {r.request_id: r.num_computed_tokens for r in self.sched.running()}
            out, result = step(self.sched, self.model)
            self.clock.advance(self.step_seconds)
            self.preemptions_seen += len(out.preempted)
            for r in out.preempted:
                check(r.status is RequestStatus.PREEMPTED and r.block_ids == []
                      and r.num_computed_tokens == 0, "a preempted request holds nothing",
                      f"{r.request_id}: {r.status}, blocks {r.block_ids}")
                if self.prefix_caching:  # hashes are kept, so a recompute never re-hashes
                    check(len(r.block_hashes) >= computed[r.request_id] // self.kv.block_size,
                          "a preempted request keeps its block hashes", r.request_id)
            if out.preempted and not self.preempts_to_admit:
                check(all(r.request_id in computed for r in out.requests),
                      "a step that preempts for KV admits nobody new",
                      f"preempted {[r.request_id for r in out.preempted]}")
            check(len(result.requests) == len(result.new_token_ids) == out.num_samples,
                  "one new token per sampled request")
            for r in result.finished:
                check(r.status is RequestStatus.FINISHED and r.block_ids == [],
                      "a finished request frees its blocks", r.request_id)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        req = self.requests[rid]
        was_finished = req.finished
        check(self.sched.abort(rid) is (not was_finished), "abort reports whether it aborted", rid)
        check(self.sched.abort(rid) is False, "abort is idempotent", rid)
        if not was_finished:
            self.aborted.add(rid)
            check(req.finish_reason is FinishReason.ABORT and req.block_ids == [],
                  "an aborted request frees its blocks", rid)

    @invariant()
    def partition(self) -> None:
        sched = self.sched
        running = sched.running()
        waiting = list(sched.policy)
        check(len(running) <= sched.max_num_seqs, "sequence budget respected")
        ids = [r.request_id for r in running + waiting]
        check(len(ids) == len(set(ids)), "nothing duplicated",
              "a request is both waiting and running, or queued twice")
        unfinished = {rid for rid, r in self.requests.items() if not r.finished}
        check(set(ids) == unfinished, "nothing lost",
              f"lost {sorted(unfinished - set(ids))}, resurrected {sorted(set(ids) - unfinished)}")
        for r in running:
            check(r.status is RequestStatus.RUNNING, "running requests are RUNNING", r.request_id)
            check(len(r.block_ids) * self.kv.block_size >= r.num_computed_tokens,
                  "block table covers computed tokens", r.request_id)
        for r in waiting:
            check(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and not r.block_ids,
                  "waiting requests hold no blocks", r.request_id)
        held = {b for r in running for b in r.block_ids}
        check(self.kv.num_free_blocks + len(held) == self.kv.num_blocks, "blocks conserved",
              f"{self.kv.num_free_blocks} free + {len(held)} held != {self.kv.num_blocks}")
        check(sched.waiting_tokens == sum(len(r.token_ids) for r in waiting),
              "waiting-token count matches the queue")

    def teardown(self) -> None:
        for _ in range(10_000):
            if not self.sched.has_unfinished_requests():
                break
            step(self.sched, self.model)
            self.partition()
        drain(self.sched, self.model, max_steps=1)
        check(self.kv.num_free_blocks == self.kv.num_blocks and self.kv.num_sequences == 0,
              "every block freed", f"{self.kv.num_blocks - self.kv.num_free_blocks} blocks leaked")
        for rid, req in self.requests.items():
            check(req.finished, "every request finishes or is aborted", rid)
            expected = reference_output(req.prompt_token_ids, req.params, self.max_model_len)
            if rid in self.aborted:
                check(expected[: req.num_output_tokens] == req.output_token_ids,
                      "outputs identical to running each request alone", f"aborted {rid}")
                continue
            check(req.output_token_ids == expected, "outputs identical to running each request "
                  "alone", f"{rid}: got {req.output_token_ids}, alone {expected}")
            last = req.output_token_ids[-1]
            stopped = last in req.stop_ids and req.num_output_tokens >= req.params.min_tokens
            check(req.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH),
                  "finish reason matches the stopping rule", f"{rid}: {req.finish_reason}")


def check_starvation(policy_factory: PolicyFactory, *, bound_steps: int = 400,
                     backlog: int = 8, period: int = 7, seed: int = 0,
                     victim_policy_factory: VictimFactory | None = None) -> None:
    """Every request finishes within ``bound_steps`` steps of its arrival, under a flood.

    Tenant ``"a"`` (priority 0) keeps ``backlog`` requests waiting at every step; tenant
    ``"b"`` (priority 1, the worse one) adds a request every ``period`` steps. A policy that
    lets the flood starve ``b`` (or anyone) fails with the invariant ``no starvation``.
    """
    rng = Random(seed)
    clock = FakeClock()
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                      policy=policy_factory(), eos_token_ids=[EOS], clock=clock,
                      victim_policy=victim_policy_factory() if victim_policy_factory else None)
    model = FakeModel(kv)
    arrived: dict[str, int] = {}
    live: dict[str, Request] = {}
    serial = 0

    def add(tenant: str, priority: int, at: int) -> None:
        nonlocal serial
        prompt = [rng.randrange(1, 23) for _ in range(rng.randrange(2, 9))]
        rid = f"{tenant}{serial}"
        serial += 1
        params = SamplingParams(max_tokens=rng.randrange(1, 6), ignore_eos=True)
        req = Request(rid, prompt, params, priority=priority, tenant=tenant)
        sched.add_request(req)
        arrived[rid], live[rid] = at, req

    total = 3 * bound_steps
    for now in range(total):
        if now < total - bound_steps:  # the last arrivals still get their full bound
            flood = sum(r.tenant == "a" and r.status in _QUEUED for r in live.values())
            for _ in range(backlog - flood):
                add("a", 0, now)
            if now % period == 0:
                add("b", 1, now)
        step(sched, model)
        clock.advance(0.1)
        for rid in [rid for rid, r in live.items() if r.finished]:
            del live[rid]
        for rid, req in live.items():
            waited = now + 1 - arrived[rid]
            check(waited <= bound_steps, "no starvation",
                  f"request {rid} of tenant {req.tenant!r} unfinished after {waited} steps "
                  f"(bound {bound_steps}) while tenant 'a' floods the queue")


class SchedulingPolicyContract:
    """Conformance tests for a scheduling policy; subclass with ``policy_factory``.

    Options (class attributes): ``victim_policy_factory`` (a preemption-victim policy to run
    with it; default: the policy's own ranking), ``max_examples`` and ``steps`` of the state
    machine,
    ``seed`` (None: the same derandomized examples every run), ``shrink`` (minimise a failing
    example: slower, clearer), ``prefix_caching``,
    ``starvation_bound`` in steps (None skips the starvation check, for policies that starve
    by design, such as strict priority).
    """

    policy_factory: ClassVar[PolicyFactory]
    victim_policy_factory: ClassVar[VictimFactory | None] = None
    max_examples: ClassVar[int] = 25
    steps: ClassVar[int] = 30
    seed: ClassVar[int | None] = None
    shrink: ClassVar[bool] = False
    prefix_caching: ClassVar[bool] = True
    starvation_bound: ClassVar[int | None] = 400

    def _victim(self) -> VictimFactory:
        victim = getattr(type(self), "victim_policy_factory", None)
        return victim if victim is not None else (lambda: None)

    def _factory(self) -> PolicyFactory:
        factory = getattr(type(self), "policy_factory", None)
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set policy_factory")
        return factory  # type: ignore[no-any-return]

    def test_implements_the_interface(self) -> None:
        """The policy (and victim policy) implement their interfaces at servekit's version."""
        policy, victim = self._factory()(), self._victim()()
        if policy is not None:
            check_interface(policy, "policy")
        if victim is not None:
            check_interface(victim, "victim_policy")

    def test_scheduler_invariants(self) -> None:
        """Budgets, nothing lost or duplicated, blocks freed, outputs as if run alone."""
        machine = type("PolicyMachine", (SchedulerMachine,), {
            "policy_factory": staticmethod(self._factory()),
            "victim_policy_factory": staticmethod(self._victim()),
            "prefix_caching": type(self).prefix_caching,
        })
        cls = type(self)
        run_machine(machine, max_examples=cls.max_examples, steps=cls.steps, seed=cls.seed,
                    shrink=cls.shrink)

    def test_no_starvation(self) -> None:
        """Every request finishes within ``starvation_bound`` steps while one tenant floods."""
        bound = type(self).starvation_bound
        if bound is None:
            return
        check_starvation(self._factory(), bound_steps=bound, seed=type(self).seed or 0,
                         victim_policy_factory=self._victim())


class VictimPolicyContract(SchedulingPolicyContract):
    """The scheduling kit for a preemption-victim policy (``victim_policy_factory``), with the
    default queue (FCFS) unless ``policy_factory`` is set too."""

    policy_factory: ClassVar[PolicyFactory] = staticmethod(lambda: None)  # type: ignore[assignment]


def scheduling_policy_contract(policy_factory: PolicyFactory,
                               **options: Any) -> type[SchedulingPolicyContract]:
    """A :class:`SchedulingPolicyContract` subclass for ``policy_factory`` (assign it to a
    ``Test*`` name): ``TestMine = scheduling_policy_contract(MyPolicy, seed=3)``."""
    return type("TestSchedulingPolicy", (SchedulingPolicyContract,),
                {"policy_factory": staticmethod(policy_factory), **options})
