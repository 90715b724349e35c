"""Conformance kits for servekit plugins, workload strategies and fakes (``servekit[testing]``).

Each kit is a class of pytest tests that takes a factory for the plugin under test; subclass it
in one line and pytest runs it::

    from servekit.testing import SchedulingPolicyContract

    class TestDeadlinePolicy(SchedulingPolicyContract):
        policy_factory = DeadlinePolicy

A broken contract fails with :class:`InvariantViolation`, whose message names the invariant.
``FakeEngine`` (an instant engine for server tests) is imported on first use, so the ``server``
extra is needed only by those who use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from servekit._optional import require

require("hypothesis", "testing")

from servekit.testing._check import InvariantViolation, check  # noqa: E402
from servekit.testing.clock import FakeClock  # noqa: E402
from servekit.testing.fake_model import FakeModel, next_token, reference_output  # noqa: E402
from servekit.testing.sched import (  # noqa: E402
    SchedulerMachine,
    SchedulingPolicyContract,
    check_starvation,
    scheduling_policy_contract,
)
from servekit.testing.strategies import RequestSpec, workloads  # noqa: E402

if TYPE_CHECKING:
    from servekit.server.fake import FakeEngine, FakeTokenizer

__all__ = [
    "FakeClock",
    "FakeEngine",
    "FakeModel",
    "FakeTokenizer",
    "InvariantViolation",
    "RequestSpec",
    "SchedulerMachine",
    "SchedulingPolicyContract",
    "check",
    "check_starvation",
    "next_token",
    "reference_output",
    "scheduling_policy_contract",
    "workloads",
]

_LAZY = {"FakeEngine", "FakeTokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from servekit.server import fake

        return getattr(fake, name)
    raise AttributeError(f"module 'servekit.testing' has no attribute {name!r}")
