"""The scheduling-policy kit: built-in policies pass it; planted bugs fail it by name."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pytest

from servekit.sched import FairSharePolicy, FCFSPolicy, PriorityPolicy, Request, SchedulingPolicy
from servekit.sched.policy import LowestPriorityVictimPolicy, NewestVictimPolicy
from servekit.testing import (
    InvariantViolationError,
    SchedulingPolicyContract,
    VictimPolicyContract,
    scheduling_policy_contract,
)


class TestFCFS(SchedulingPolicyContract):
    policy_factory = FCFSPolicy


class TestPriority(SchedulingPolicyContract):
    policy_factory = PriorityPolicy


class TestFairShare(SchedulingPolicyContract):
    policy_factory = FairSharePolicy


TestFairWeighted = pytest.mark.slow(
    scheduling_policy_contract(lambda: FairSharePolicy({"a": 2.0}), seed=7))


class TestNewestVictim(VictimPolicyContract):
    victim_policy_factory = NewestVictimPolicy


@pytest.mark.slow
class TestLowestPriorityVictimUnderFairShare(VictimPolicyContract):
    policy_factory = FairSharePolicy
    victim_policy_factory = LowestPriorityVictimPolicy


class TenantFirstPolicy(FCFSPolicy):
    """Planted bug: tenant 'a' always goes first, so a flood from 'a' starves everyone else."""

    def peek(self) -> Request | None:
        for r in self._queue:
            if r.tenant == "a":
                return r
        return super().peek()

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None
        self._queue.remove(head)
        return head


class LosingPolicy(FCFSPolicy):
    """Planted bug: a preempted request is dropped instead of re-queued."""

    def push_preempted(self, request: Request) -> None:
        pass


class DuplicatingPolicy(SchedulingPolicy):
    """Planted bug: iteration shows every queued request twice."""

    def __init__(self) -> None:
        self.q: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self.q.append(request)

    def push_preempted(self, request: Request) -> None:
        self.q.appendleft(request)

    def peek(self) -> Request | None:
        return self.q[0] if self.q else None

    def pop(self) -> Request:
        return self.q.popleft()

    def remove(self, request: Request) -> None:
        self.q.remove(request)

    def __len__(self) -> int:
        return len(self.q)

    def __iter__(self) -> Iterator[Request]:
        return iter([*self.q, *self.q])


def test_starving_policy_fails_the_starvation_check() -> None:
    kit = scheduling_policy_contract(TenantFirstPolicy, starvation_bound=100)()
    with pytest.raises(InvariantViolationError, match="no starvation") as info:
        kit.test_no_starvation()
    assert "tenant 'b'" in str(info.value)


def test_strict_priority_starves_and_may_opt_out() -> None:
    strict = scheduling_policy_contract(lambda: PriorityPolicy(aging_rate=0.0),
                                        starvation_bound=150)()
    with pytest.raises(InvariantViolationError, match="no starvation"):
        strict.test_no_starvation()
    scheduling_policy_contract(lambda: PriorityPolicy(aging_rate=0.0),
                               starvation_bound=None)().test_no_starvation()


def test_losing_policy_fails_nothing_lost() -> None:
    kit = scheduling_policy_contract(LosingPolicy, starvation_bound=None)()
    with pytest.raises(InvariantViolationError, match="nothing lost"):
        kit.test_scheduler_invariants()


def test_duplicating_policy_fails_nothing_duplicated() -> None:
    kit = scheduling_policy_contract(DuplicatingPolicy, starvation_bound=None)()
    with pytest.raises(InvariantViolationError, match="nothing duplicated"):
        kit.test_scheduler_invariants()


def test_missing_factory_is_named() -> None:
    class TestNothing(SchedulingPolicyContract):
        pass

    with pytest.raises(TypeError, match="must set policy_factory"):
        TestNothing().test_scheduler_invariants()



class FuturePolicy(FCFSPolicy):
    api_version = 2


def test_wrong_interface_version_is_named() -> None:
    kit = scheduling_policy_contract(FuturePolicy)()
    with pytest.raises(InvariantViolationError, match="implements the policy interface") as info:
        kit.test_implements_the_interface()
    assert "api_version 2" in str(info.value)


def test_not_a_policy_is_named() -> None:
    kit = scheduling_policy_contract(object)()  # type: ignore[arg-type]
    with pytest.raises(InvariantViolationError, match=r"is not a servekit\.sched\.policy"):
        kit.test_implements_the_interface()
