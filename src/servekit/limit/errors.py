"""The limiter's exceptions: one for "over the limit", the others for misuse or a broken store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from servekit.errors import ServekitError

if TYPE_CHECKING:
    from servekit.limit.decision import Decision


class LimitConfigError(ServekitError, ValueError):
    """A limit is configured wrongly (zero or negative rate or capacity, duplicate name)."""


class InvalidCostError(ServekitError, ValueError):
    """A cost is negative, not finite, or names a limit the limiter does not have."""


class RequestTooLargeError(InvalidCostError):
    """A cost exceeds a limit's capacity, so no amount of waiting could admit it."""


class ReservationError(ServekitError, RuntimeError):
    """A reservation was settled twice."""


class StoreFullError(ServekitError, RuntimeError):
    """The memory store holds ``max_keys`` keys and none of them may be dropped yet.

    A key is dropped only when all its buckets are full (dropping it then changes no decision),
    so this means more keys are active at once than the store was sized for.
    """


class StoreUnavailableError(ServekitError, ConnectionError):
    """The store (Redis) could not be reached; the limiter applies its fail-open/closed policy."""


class RateLimitExceeded(ServekitError):
    """The request is over its rate limit (or could not be admitted within its wait).

    ``retry_after`` is the number of seconds after which the same request may succeed;
    ``decision`` is the denied decision (render headers from it); ``reason`` says why:
    ``"limit"``, ``"timeout"`` (the wait ran out) or ``"waiters"`` (too many waiters).
    """

    def __init__(self, decision: Decision, reason: str = "limit") -> None:
        self.decision = decision
        self.retry_after = decision.retry_after
        self.reason = reason
        names = ", ".join(decision.denied_by) or "store"
        super().__init__(
            f"rate limit exceeded for key {decision.key!r} ({names}; {reason}): "
            f"retry after {decision.retry_after:.3f}s"
        )
