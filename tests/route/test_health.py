"""HealthTracker: ejection, half-open probes, manual marks — checked against a model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from servekit.route import HealthTracker
from servekit.route.errors import DuplicateNodeError, InvalidRouteParameterError, UnknownNodeError
from servekit.route.health import NodeHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ejection_then_half_open_probe() -> None:
    clock = FakeClock()
    h = HealthTracker(failure_threshold=3, cooldown=10.0, clock=clock)
    h.add("a")
    h.record_failure("a")
    h.record_failure("a")
    h.record_success("a")  # resets the streak
    assert h.failures("a") == 0
    for _ in range(3):
        h.record_failure("a")
    assert h.state("a") is NodeHealth.EJECTED and not h.routable("a")
    clock.now = 9.9
    assert not h.routable("a")
    clock.now = 10.0
    assert h.routable("a")
    h.dispatched("a")  # the probe
    assert h.state("a") is NodeHealth.PROBING and not h.routable("a")
    h.record_failure("a")  # probe failed: ejected again for a full cool-down
    assert h.state("a") is NodeHealth.EJECTED and h.ejections == 2
    clock.now = 19.0
    assert not h.routable("a")
    clock.now = 20.0
    h.dispatched("a")
    h.record_success("a")
    assert h.state("a") is NodeHealth.UP and h.routable("a")


def test_lost_probe_expires_and_success_during_ejection_is_ignored() -> None:
    clock = FakeClock()
    h = HealthTracker(failure_threshold=1, cooldown=5.0, clock=clock)
    h.add("a")
    h.record_failure("a")
    h.record_success("a")  # a request sent before the ejection: not a probe
    assert h.state("a") is NodeHealth.EJECTED
    clock.now = 5.0
    h.dispatched("a")
    clock.now = 9.0
    assert not h.routable("a")
    clock.now = 10.0  # the probe never reported: another may go
    assert h.routable("a")


def test_manual_marks() -> None:
    h = HealthTracker(clock=FakeClock())
    h.add("a")
    h.mark_down("a")
    h.record_success("a")
    assert not h.routable("a") and h.state("a") is NodeHealth.DOWN
    h.mark_up("a")
    assert h.routable("a")


def test_readmit_after_mark_down_is_half_open() -> None:
    clock = FakeClock()
    h = HealthTracker(failure_threshold=3, cooldown=5.0, clock=clock)
    h.add("a")
    h.mark_down("a")
    clock.now = 1.0
    h.readmit("a")  # it answers again: one probe decides, no cool-down to sit out
    assert h.state("a") is NodeHealth.EJECTED and h.routable("a") and h.up_for("a") is None
    h.dispatched("a")
    assert h.state("a") is NodeHealth.PROBING and not h.routable("a")  # nothing else goes
    h.record_failure("a")  # the probe failed: a full cool-down now
    assert h.state("a") is NodeHealth.EJECTED and not h.routable("a")
    clock.now = 6.0
    h.dispatched("a")
    h.record_success("a")
    assert h.state("a") is NodeHealth.UP and h.up_for("a") == 0.0  # slow start from here
    h.readmit("a")  # only a DOWN node is readmitted
    assert h.state("a") is NodeHealth.UP


def test_bad_input() -> None:
    with pytest.raises(InvalidRouteParameterError, match="failure_threshold"):
        HealthTracker(failure_threshold=0)
    with pytest.raises(InvalidRouteParameterError, match="cooldown"):
        HealthTracker(cooldown=-1)
    h = HealthTracker()
    h.add("a")
    with pytest.raises(DuplicateNodeError):
        h.add("a")
    with pytest.raises(UnknownNodeError):
        h.record_failure("b")
    h.remove("a")
    with pytest.raises(UnknownNodeError):
        h.state("a")


class HealthMachine(RuleBasedStateMachine):
    """The tracker agrees with a tiny reference model under any sequence of events."""

    THRESHOLD, COOLDOWN = 3, 4.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.h = HealthTracker(
            failure_threshold=self.THRESHOLD, cooldown=self.COOLDOWN, clock=self.clock
        )
        self.h.add("n")
        self.state, self.streak, self.since = "up", 0, 0.0

    def _cooled(self) -> bool:
        return self.clock.now - self.since >= self.COOLDOWN

    @rule(dt=st.sampled_from([0.0, 1.0, 2.5, 4.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def dispatch(self) -> None:
        self.h.dispatched("n")
        if self.state in ("ejected", "probing") and self._cooled():
            self.state, self.since = "probing", self.clock.now

    @rule()
    def success(self) -> None:
        self.h.record_success("n")
        if self.state in ("up", "probing"):
            self.state, self.streak = "up", 0

    @rule()
    def failure(self) -> None:
        self.h.record_failure("n")
        self.streak += 1
        if self.state == "probing" or (self.state == "up" and self.streak >= self.THRESHOLD):
            self.state, self.since = "ejected", self.clock.now

    @rule(up=st.booleans())
    def mark(self, up: bool) -> None:
        if up:
            self.h.mark_up("n")
            self.state, self.streak = "up", 0
        else:
            self.h.mark_down("n")
            self.state = "down"

    @rule()
    def readmit(self) -> None:
        self.h.readmit("n")
        if self.state == "down":
            self.state, self.streak, self.since = "ejected", 0, self.clock.now - self.COOLDOWN

    @invariant()
    def agrees(self) -> None:
        assert self.h.state("n").value == self.state
        expected = self.state == "up" or (self.state in ("ejected", "probing") and self._cooled())
        assert self.h.routable("n") == expected


TestHealthMachine = HealthMachine.TestCase
TestHealthMachine.settings = settings(max_examples=40, stateful_step_count=25)
