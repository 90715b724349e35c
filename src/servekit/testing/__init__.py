"""Conformance kits for servekit plugins, workload strategies and fakes (``servekit[testing]``).

Each kit is a class of pytest tests that takes a factory for the plugin under test; subclass it
in one line and pytest runs it::

    from servekit.testing import SchedulingPolicyContract

    class TestDeadlinePolicy(SchedulingPolicyContract):
        policy_factory = DeadlinePolicy

A broken contract fails with :class:`InvariantViolationError`, whose message names the invariant.
``FakeEngine`` (an instant engine for server tests) is imported on first use, so the ``server``
extra is needed only by those who use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from servekit._optional import require

require("hypothesis", "testing")

from servekit.testing._check import InvariantViolationError, check  # noqa: E402
from servekit.testing.clock import FakeClock  # noqa: E402
from servekit.testing.fake_model import FakeModel, next_token, reference_output  # noqa: E402
from servekit.testing.hooks import HookContract, check_event_order, hook_contract  # noqa: E402
from servekit.testing.limit import (  # noqa: E402
    LimiterStoreContract,
    UnavailableStore,
    limiter_store_contract,
)
from servekit.testing.route import RoutingPolicyContract, routing_policy_contract  # noqa: E402
from servekit.testing.sched import (  # noqa: E402
    SchedulerMachine,
    SchedulingPolicyContract,
    VictimPolicyContract,
    check_starvation,
    scheduling_policy_contract,
)
from servekit.testing.serve import serve  # noqa: E402
from servekit.testing.strategies import (  # noqa: E402
    RequestSpec,
    arrival_times,
    prompts,
    request_specs,
    to_request,
    workloads,
)
from servekit.testing.usage import UsageSinkContract, usage_records, usage_sink_contract  # noqa: E402

if TYPE_CHECKING:
    from servekit.server.fake import FakeEngine, FakeTokenizer

__all__ = [
    "FakeClock",
    "FakeEngine",
    "FakeModel",
    "FakeTokenizer",
    "HookContract",
    "InvariantViolationError",
    "LimiterStoreContract",
    "RequestSpec",
    "RoutingPolicyContract",
    "SchedulerMachine",
    "SchedulingPolicyContract",
    "UnavailableStore",
    "UsageSinkContract",
    "VictimPolicyContract",
    "arrival_times",
    "check",
    "check_event_order",
    "check_starvation",
    "hook_contract",
    "limiter_store_contract",
    "next_token",
    "prompts",
    "reference_output",
    "request_specs",
    "routing_policy_contract",
    "scheduling_policy_contract",
    "serve",
    "to_request",
    "usage_records",
    "usage_sink_contract",
    "workloads",
]

_LAZY = {"FakeEngine", "FakeTokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from servekit.server import fake

        return getattr(fake, name)
    raise AttributeError(f"module 'servekit.testing' has no attribute {name!r}")
