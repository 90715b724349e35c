"""A fake clock for the parts that take ``clock=`` (scheduler, limiter, router, health)."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance(dt)`` moves it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new time."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self.now += seconds
        return self.now
