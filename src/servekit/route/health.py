"""Passive and manual health of nodes: ejection after consecutive failures, half-open retry.

A node is ``UP`` until ``failure_threshold`` consecutive failures eject it. After ``cooldown``
seconds of the injected clock an ejected node becomes routable again for one probe request: the
router's dispatch moves it to ``PROBING`` (no other request goes there meanwhile); the probe's
success brings it ``UP``, its failure ejects it for another cool-down (a probe that never
reports expires after ``cooldown``). ``mark_down`` takes a node out until ``mark_up``, or
until ``readmit``: a node taken out (it stopped answering) that answers again is half-open at
once, so one probe request decides whether it comes back ``UP``.
:meth:`HealthTracker.up_for` tells how long ago a node came back ``UP`` (the router's slow start).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable

from attrs import define

from servekit._validators import int_at_least
from servekit.route.errors import DuplicateNodeError, InvalidRouteParameterError, UnknownNodeError


class NodeHealth(enum.Enum):
    """A node's health state."""

    UP = "up"
    EJECTED = "ejected"
    PROBING = "probing"
    DOWN = "down"


@define(slots=True)
class _State:
    health: NodeHealth = NodeHealth.UP
    failures: int = 0
    since: float = 0.0  # when it was ejected, or when its probe was dispatched
    returned: float | None = None  # when it last came back UP (None: UP since it was added)


_AT_LEAST_ONE = int_at_least(1, error=InvalidRouteParameterError)


class HealthTracker:
    """Tracks each node's health from request outcomes and manual marks.

    ``clock`` returns monotonic seconds (``time.monotonic`` by default; inject a fake in tests).
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _AT_LEAST_ONE.check("failure_threshold", failure_threshold)
        if not isinstance(cooldown, (int, float)) or not math.isfinite(cooldown) or cooldown < 0:
            raise InvalidRouteParameterError(
                "cooldown", f"must be finite and >= 0, got {cooldown!r}"
            )
        self.failure_threshold = failure_threshold
        self.cooldown = float(cooldown)
        self.clock = clock
        self.ejections = 0
        self._nodes: dict[str, _State] = {}

    def add(self, node: str) -> None:
        """Track ``node``, starting ``UP``."""
        if node in self._nodes:
            raise DuplicateNodeError(node)
        self._nodes[node] = _State()

    def remove(self, node: str) -> None:
        """Stop tracking ``node``."""
        self._get(node)
        del self._nodes[node]

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def state(self, node: str) -> NodeHealth:
        """``node``'s current state."""
        return self._get(node).health

    def failures(self, node: str) -> int:
        """``node``'s consecutive failures since its last success."""
        return self._get(node).failures

    def up_for(self, node: str, now: float | None = None) -> float | None:
        """Seconds since ``node`` last came back ``UP`` (after an ejection, a probe or a
        ``mark_down``); None when it is not ``UP`` or has been since it was added."""
        s = self._get(node)
        if s.health is not NodeHealth.UP or s.returned is None:
            return None
        return (self.clock() if now is None else now) - s.returned

    def routable(self, node: str, now: float | None = None) -> bool:
        """Whether a request may go to ``node`` now (an ejected node after its cool-down, for a
        probe)."""
        s = self._get(node)
        if s.health is NodeHealth.UP:
            return True
        if s.health is NodeHealth.DOWN:
            return False
        return (self.clock() if now is None else now) - s.since >= self.cooldown

    def dispatched(self, node: str, now: float | None = None) -> None:
        """A request was sent to ``node``: an ejected node past its cool-down starts probing."""
        s = self._get(node)
        if s.health in (NodeHealth.EJECTED, NodeHealth.PROBING):
            now = self.clock() if now is None else now
            if now - s.since >= self.cooldown:
                s.health, s.since = NodeHealth.PROBING, now

    def record_success(self, node: str) -> None:
        """A request to ``node`` succeeded: failures reset, a probing node comes back ``UP``."""
        s = self._get(node)
        if s.health is NodeHealth.PROBING:
            s.returned = self.clock()
        if s.health is NodeHealth.UP or s.health is NodeHealth.PROBING:
            s.health, s.failures = NodeHealth.UP, 0

    def record_failure(self, node: str) -> None:
        """A request to ``node`` failed: ejects it at the threshold, or when its probe failed."""
        s = self._get(node)
        s.failures += 1
        if s.health is NodeHealth.PROBING or (
            s.health is NodeHealth.UP and s.failures >= self.failure_threshold
        ):
            s.health, s.since = NodeHealth.EJECTED, self.clock()
            self.ejections += 1

    def mark_down(self, node: str) -> None:
        """Take ``node`` out of rotation until :meth:`mark_up`."""
        self._get(node).health = NodeHealth.DOWN

    def mark_up(self, node: str) -> None:
        """Put ``node`` back ``UP`` with no failures (also ends an ejection)."""
        s = self._get(node)
        if s.health is not NodeHealth.UP:
            s.returned = self.clock()
        s.health, s.failures = NodeHealth.UP, 0

    def readmit(self, node: str) -> None:
        """A ``DOWN`` node answers again: half-open, routable for one probe request whose
        success brings it ``UP`` and whose failure ejects it for a cool-down (other states
        are left as they are)."""
        s = self._get(node)
        if s.health is NodeHealth.DOWN:
            s.health, s.failures, s.since = NodeHealth.EJECTED, 0, self.clock() - self.cooldown

    def _get(self, node: str) -> _State:
        try:
            return self._nodes[node]
        except KeyError:
            raise UnknownNodeError(node) from None
