"""Running a kit's hypothesis state machines with fixed example counts and an optional seed."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test


def kit_settings(max_examples: int, steps: int, seed: int | None,
                 shrink: bool = False) -> settings:
    """Fixed example counts; derandomized (the same examples every run) unless ``seed`` is set;
    failing examples are minimised only when ``shrink`` (it can take minutes)."""
    phases = tuple(Phase) if shrink else tuple(p for p in Phase if p is not Phase.shrink)
    return settings(
        phases=phases,
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=seed is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def run_machine(machine: type[RuleBasedStateMachine], *, max_examples: int, steps: int,
                seed: int | None, shrink: bool = False) -> None:
    """Run ``machine`` as a test; raises the first failure hypothesis finds."""
    chosen = kit_settings(max_examples, steps, seed, shrink)
    if seed is None:
        run_state_machine_as_test(machine, settings=chosen)
        return
    from hypothesis.stateful import get_state_machine_test

    test: Any = get_state_machine_test(machine, settings=chosen)
    hypothesis_seed(seed)(test)()


def run_given(test: Any, chosen: settings, seed: int | None) -> None:
    """Run a ``@given`` test function under ``chosen`` settings and ``seed``."""
    test = chosen(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()
