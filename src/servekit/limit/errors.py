"""The limiter's exceptions for misuse or a broken store.

"Over the limit" carries a :class:`~servekit.limit.decision.Decision`, so it lives beside it
(:class:`~servekit.limit.decision.RateLimitExceededError`) and this module stays a leaf.
"""

from __future__ import annotations

from servekit.errors import ServekitError


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
