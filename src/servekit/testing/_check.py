"""How a kit reports a broken contract: an :class:`InvariantViolation` naming the invariant."""

from __future__ import annotations


class InvariantViolation(AssertionError):
    """A plugin broke an invariant of its contract; ``invariant`` names it."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"invariant violated: {invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


def check(ok: object, invariant: str, detail: str = "") -> None:
    """Raise :class:`InvariantViolation` for ``invariant`` unless ``ok`` is true.

    Unlike ``assert`` it also runs under ``python -O``.
    """
    if not ok:
        raise InvariantViolation(invariant, detail)
