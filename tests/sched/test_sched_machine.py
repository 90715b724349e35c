"""Stateful property tests: random arrivals, aborts and tight KV budgets against a fake model.

The machine is :class:`servekit.testing.SchedulerMachine` (the scheduling-policy kit's). It
checks after every step: budgets, a consistent partition of requests into waiting, running and
finished, block tables that cover what runs, and the KV each step reads (checked by the fake
model). At teardown every request finishes, every block is free, and every request's output
equals what the model generates for it alone: so outputs are identical with and without
preemption, chunking and prefix caching.
"""

from __future__ import annotations

from hypothesis import settings

from servekit.sched import FairSharePolicy, PriorityPolicy
from servekit.testing import SchedulerMachine

SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None)


class FCFSMachine(SchedulerMachine):
    pass


class NoPrefixCacheMachine(SchedulerMachine):
    prefix_caching = False


class PriorityMachine(SchedulerMachine):
    policy_factory = staticmethod(lambda: PriorityPolicy(aging_rate=0.5))


class FairMachine(SchedulerMachine):
    policy_factory = staticmethod(lambda: FairSharePolicy({"a": 2.0}))


TestFCFS = SETTINGS(FCFSMachine).TestCase
TestNoPrefixCache = SETTINGS(NoPrefixCacheMachine).TestCase
TestPriority = SETTINGS(PriorityMachine).TestCase
TestFair = SETTINGS(FairMachine).TestCase
