"""One implementation of servekit's numeric parameter checks, raising each part's own error.

A factory (:func:`int_at_least`, :func:`number_in`) returns a :class:`Validator`: pass it as
``attrs.field(validator=...)`` in an attrs class, or call :meth:`Validator.check` on a plain
``__init__`` argument. Either way a rejected value raises ``error(name, problem)``, e.g.
``InvalidRouteParameterError("vnodes", "must be an integer >= 1, got 0")``; an error class whose
constructor takes only a message is adapted with :func:`prefixed`. ``bool`` is never a number
here, although Python counts it as an ``int``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, final

#: Builds the error for a rejected value from the field's name and what is wrong with the value.
ErrorFactory = Callable[[str, str], Exception]

_V = TypeVar("_V")


def prefixed(error: Callable[[str], Exception]) -> ErrorFactory:
    """Adapt an error class taking one message: it gets ``"<name> <problem>"``."""

    def make(name: str, problem: str) -> Exception:
        return error(f"{name} {problem}")

    return make


@final
class Validator:
    """A check of one value; an attrs validator, and :meth:`check` for plain arguments."""

    __slots__ = ("_accepts", "_error", "requirement")

    def __init__(
        self, accepts: Callable[[object], bool], requirement: str, error: ErrorFactory
    ) -> None:
        self._accepts = accepts
        self._error = error
        #: What an accepted value is, e.g. ``"must be an integer >= 1"``.
        self.requirement = requirement

    def check(self, name: str, value: _V) -> _V:
        """``value`` unchanged if accepted, else the error naming ``name``."""
        if not self._accepts(value):
            raise self._error(name, f"{self.requirement}, got {value!r}")
        return value

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        """The attrs validator protocol: checks ``value`` under the attribute's name."""
        self.check(attribute.name, value)

    def __repr__(self) -> str:
        return f"<Validator {self.requirement}>"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_real(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def int_at_least(minimum: int, *, error: ErrorFactory) -> Validator:
    """Accepts an ``int`` (not ``bool``) ``>= minimum``."""
    return Validator(
        lambda v: _is_int(v) and v >= minimum,  # type: ignore[operator]
        f"must be an integer >= {minimum}",
        error,
    )


def number_in(
    low: float, high: float = math.inf, *, error: ErrorFactory, low_open: bool = False
) -> Validator:
    """Accepts a finite ``int`` or ``float`` (not ``bool``) from ``low`` to ``high``.

    Both ends are included, except ``low`` when ``low_open`` (``number_in(0, low_open=True,
    error=...)`` is "a finite number > 0"); ``high=math.inf`` leaves it unbounded above.
    """
    if math.isinf(high):
        bounds = f"> {low}" if low_open else f">= {low}"
    else:
        bounds = f"in {'(' if low_open else '['}{low}, {high}]"

    def accepts(value: object) -> bool:
        if not _is_finite_real(value):
            return False
        number: float = value  # type: ignore[assignment]
        return (low < number if low_open else low <= number) and number <= high

    return Validator(accepts, f"must be a finite number {bounds}", error)
