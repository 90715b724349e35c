"""What a limiter returns: a :class:`Decision` per check, and a :class:`Reservation` to settle.

A decision keeps the raw bucket state it was made from (``now`` and each limit's ``full_at``);
the per-limit view (:attr:`Decision.statuses`) is computed only when a front end asks for it,
so the hot path allocates one object.
"""

from __future__ import annotations

from attrs import frozen

from servekit.errors import ServekitError
from servekit.limit.bucket import LimitSet


@frozen(slots=True)
class LimitStatus:
    """One limit's state after a decision: ``remaining`` tokens of ``limit``, full in ``reset`` s."""

    name: str
    limit: float
    remaining: float
    reset: float


class Reservation:
    """Costs taken at admission, to be settled with the real usage (``Limiter.settle``).

    Unsettled, it expires after the limiter's ``reservation_ttl``: its charge then stands.
    """

    __slots__ = ("costs", "expires_at", "key", "settled")

    def __init__(self, key: str, costs: tuple[float, ...], expires_at: float) -> None:
        self.key = key
        self.costs = costs
        self.expires_at = expires_at
        self.settled = False

    def __repr__(self) -> str:
        state = "settled" if self.settled else "open"
        return f"Reservation(key={self.key!r}, costs={self.costs!r}, {state})"


class Decision:
    """The outcome of one rate-limit check for ``key``.

    ``allowed`` is what to enforce (always True in shadow mode); ``conforming`` is the verdict
    of the limits themselves. ``retry_after`` is 0 when conforming, else the seconds until the
    same cost would be admitted. ``error`` names a store failure that the fail-open/closed
    policy decided instead of the limits. ``reservation`` is set when one was requested and taken.
    """

    #: a store failure decided this instead of the limits (set by the limiter), else None
    error: str | None = None
    #: the reservation to settle, when one was requested and taken
    reservation: Reservation | None = None
    _retry_after: float | None = None

    # No __slots__: the rarely set fields above are class-level defaults, so the hot path
    # (one Decision per check) stores only the eight fields every decision has.
    def __init__(
        self,
        key: str,
        limits: LimitSet,
        costs: tuple[float, ...],
        conforming: bool,
        now: float,
        full_at: tuple[float, ...],
        shadow: bool = False,
    ) -> None:
        self.key = key
        self.limits = limits
        self.costs = costs
        self.conforming = conforming
        self.allowed = conforming or shadow
        self.now = now
        self.full_at = full_at
        self.shadow = shadow

    @property
    def retry_after(self) -> float:
        """Seconds until the same cost would be admitted (0 when conforming)."""
        if self.conforming:
            return 0.0
        wait = self._retry_after
        if wait is None:
            wait = self._retry_after = _retry_after(self.limits, self.costs, self.now, self.full_at)
        return wait

    @property
    def denied_by(self) -> tuple[str, ...]:
        """Names of the limits that would not admit this cost (empty when conforming)."""
        if self.conforming:
            return ()
        lim = self.limits
        names = []
        for i, name in enumerate(lim.names):
            need = max(self.full_at[i], self.now) + self.costs[i] * lim.inv_rates[i] - self.now
            if need > lim.taus[i]:
                names.append(name)
        return tuple(names)

    @property
    def statuses(self) -> tuple[LimitStatus, ...]:
        """Each limit's capacity, remaining tokens (>= 0) and seconds until full, in order."""
        lim, now = self.limits, self.now
        out = []
        for i, name in enumerate(lim.names):
            debt = max(0.0, self.full_at[i] - now)
            cap = lim.capacities[i]
            out.append(LimitStatus(name, cap, max(0.0, cap - debt * lim.rates[i]), debt))
        return tuple(out)

    def status(self, name: str) -> LimitStatus:
        """The :class:`LimitStatus` of the limit called ``name`` (KeyError if none)."""
        return self.statuses[self.limits.index[name]]

    def __bool__(self) -> bool:
        return self.allowed

    def __repr__(self) -> str:
        return (
            f"Decision(key={self.key!r}, allowed={self.allowed}, conforming={self.conforming}, "
            f"retry_after={self.retry_after:.6g}, shadow={self.shadow}, error={self.error!r})"
        )


def _retry_after(
    limits: LimitSet, costs: tuple[float, ...], now: float, full_at: tuple[float, ...]
) -> float:
    """Seconds until every limit can take its cost (the largest wait over the limits)."""
    wait = 0.0
    for i in range(len(costs)):
        base = full_at[i] if full_at[i] > now else now
        need = base + costs[i] * limits.inv_rates[i] - limits.capacities[i] * limits.inv_rates[i]
        if need - now > wait:
            wait = need - now
    return wait


class RateLimitExceededError(ServekitError):
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


#: Deprecated alias of :class:`RateLimitExceededError` (removed in the next release).
RateLimitExceeded = RateLimitExceededError
