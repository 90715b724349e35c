"""Token-bucket math: named limits, and one bucket with an injected clock.

A bucket is stored as a single number, ``full_at``: the time at which it will be full again
(the GCRA "theoretical arrival time"). With capacity ``C`` and refill rate ``r`` tokens/s:

- tokens available at ``now``: ``C - max(0, full_at - now) * r``;
- taking ``n`` tokens: ``full_at' = max(full_at, now) + n / r``, allowed iff
  ``full_at' - now <= C / r``;
- time until ``n`` tokens are available: ``max(full_at, now) + n / r - C / r - now``.

Any ``full_at <= now`` means "full", so a bucket that is full needs no state at all: that is
what makes dropping idle keys safe. Over any window of length ``T`` the admitted cost is at most
``C + r * T`` (the debt ``full_at - now`` never exceeds ``C / r`` after an admission and falls by
one second per second), and a greedy client gets exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Final, cast

from attrs import field, frozen

from servekit._validators import number_in, prefixed
from servekit.limit.errors import InvalidCostError, LimitConfigError, RequestTooLargeError

#: Relative slack on the admission test that absorbs float rounding in ``n / r`` sums, so a
#: greedy client is admitted exactly ``C + r * T`` and not one token less; it can admit at most
#: ``1e-9 * C`` tokens more than exact arithmetic would.
REL_SLACK: Final = 1e-9

_POSITIVE = number_in(0, low_open=True, error=prefixed(LimitConfigError))


def _positive_number(field: str, value: object) -> float:
    """``value`` as a float if it is a finite real number > 0, else a LimitConfigError."""
    return float(cast(float, _POSITIVE.check(field, value)))


def _capacity(value: object) -> float:
    return _positive_number("Limit.capacity", value)


def _rate(value: object) -> float:
    return _positive_number("Limit.rate", value)


def _valid_name(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise LimitConfigError(f"Limit.name must be a non-empty string, got {value!r}")


@frozen(slots=True)
class Limit:
    """One named token bucket: ``capacity`` tokens of burst, refilled at ``rate`` tokens/s.

    ``Limit.per_minute("requests", 60)`` is OpenAI's RPM: a burst of 60, refilled at 1/s.
    """

    name: str = field(validator=_valid_name)
    capacity: float = field(converter=_capacity)
    rate: float = field(converter=_rate)

    @classmethod
    def per_period(cls, name: str, amount: float, period: float) -> Limit:
        """``amount`` tokens per ``period`` seconds, with a burst of ``amount``."""
        amount = _positive_number("Limit amount", amount)
        period = _positive_number("Limit period", period)
        return cls(name, amount, amount / period)

    @classmethod
    def per_second(cls, name: str, amount: float) -> Limit:
        """``amount`` per second."""
        return cls.per_period(name, amount, 1.0)

    @classmethod
    def per_minute(cls, name: str, amount: float) -> Limit:
        """``amount`` per minute (RPM, TPM)."""
        return cls.per_period(name, amount, 60.0)

    @classmethod
    def per_hour(cls, name: str, amount: float) -> Limit:
        """``amount`` per hour."""
        return cls.per_period(name, amount, 3600.0)

    @classmethod
    def per_day(cls, name: str, amount: float) -> Limit:
        """``amount`` per day (RPD)."""
        return cls.per_period(name, amount, 86400.0)

    @property
    def tau(self) -> float:
        """Seconds an empty bucket takes to fill (``capacity / rate``)."""
        return self.capacity / self.rate


class LimitSet:
    """An ordered, validated set of limits, with the per-limit constants the stores need."""

    __slots__ = ("capacities", "index", "inv_rates", "limits", "names", "rates", "taus")

    def __init__(self, limits: Iterable[Limit]) -> None:
        self.limits: tuple[Limit, ...] = tuple(limits)
        if not self.limits:
            raise LimitConfigError("a limiter needs at least one Limit")
        for lim in self.limits:
            if not isinstance(lim, Limit):
                raise LimitConfigError(f"expected servekit.limit.Limit, got {lim!r}")
        self.names: tuple[str, ...] = tuple(lim.name for lim in self.limits)
        if len(set(self.names)) != len(self.names):
            raise LimitConfigError(f"limit names must be unique, got {list(self.names)}")
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.capacities: tuple[float, ...] = tuple(lim.capacity for lim in self.limits)
        self.rates: tuple[float, ...] = tuple(lim.rate for lim in self.limits)
        self.inv_rates: tuple[float, ...] = tuple(1.0 / lim.rate for lim in self.limits)
        #: admission thresholds on the debt ``full_at - now``, with the rounding slack
        self.taus: tuple[float, ...] = tuple(
            lim.tau * (1.0 + REL_SLACK) + 1e-12 for lim in self.limits
        )

    def __len__(self) -> int:
        return len(self.limits)

    def __repr__(self) -> str:
        return f"LimitSet({list(self.limits)!r})"


class TokenBucket:
    """A single token bucket on an injected clock (the math of :class:`Limiter`, standalone)."""

    __slots__ = ("_clock", "_full_at", "_tau", "limit")

    def __init__(self, limit: Limit, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._clock = clock
        self._full_at = -math.inf
        self._tau = limit.tau * (1.0 + REL_SLACK) + 1e-12

    def available(self) -> float:
        """Tokens available now (negative while in debt after an over-charge)."""
        debt = self._full_at - self._clock()
        return self.limit.capacity - debt * self.limit.rate if debt > 0 else self.limit.capacity

    def try_take(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available; all or nothing."""
        _check_cost(cost, self.limit)
        now = self._clock()
        full_at = max(self._full_at, now) + cost / self.limit.rate
        if full_at - now > self._tau:
            return False
        self._full_at = full_at
        return True

    def time_until(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0 if they are now)."""
        _check_cost(cost, self.limit)
        now = self._clock()
        return max(0.0, max(self._full_at, now) + (cost - self.limit.capacity) / self.limit.rate - now)

    def charge(self, delta: float) -> None:
        """Add ``delta`` tokens of charge (negative: refund) without a check; may go into debt."""
        if not math.isfinite(delta):
            raise InvalidCostError(f"charge for limit {self.limit.name!r} must be finite, got {delta!r}")
        self._full_at = max(self._full_at, self._clock()) + delta / self.limit.rate


def _check_cost(cost: float, limit: Limit) -> None:
    if not (cost >= 0 and math.isfinite(cost)):
        raise InvalidCostError(f"cost for limit {limit.name!r} must be finite and >= 0, got {cost!r}")
    if cost > limit.capacity:
        raise RequestTooLargeError(
            f"cost {cost:g} exceeds the capacity {limit.capacity:g} of limit {limit.name!r}"
        )
