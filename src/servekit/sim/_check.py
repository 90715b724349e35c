"""Validation helpers shared by the simulator's config types (errors name the field)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from servekit.sim.errors import SimConfigError


def number(field: str, value: object, *, minimum: float | None = None, positive: bool = False,
           maximum: float | None = None) -> float:
    """``value`` as a finite float, checked against the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SimConfigError(field, f"must be a finite number, got {value!r}")
    v = float(value)
    if positive and v <= 0:
        raise SimConfigError(field, f"must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise SimConfigError(field, f"must be >= {minimum:g}, got {value!r}")
    if maximum is not None and v > maximum:
        raise SimConfigError(field, f"must be <= {maximum:g}, got {value!r}")
    return v


def integer(field: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int, checked against ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimConfigError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SimConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def table(field: str, value: object) -> Mapping[str, Any]:
    """``value`` as a mapping (a TOML table)."""
    if not isinstance(value, Mapping):
        raise SimConfigError(field, f"must be a table, got {value!r}")
    return value


def known_keys(field: str, data: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Reject keys not in ``allowed`` (a typo must not be silently ignored)."""
    extra = sorted(set(data) - set(allowed))
    if extra:
        prefix = f"{field}." if field else ""
        raise SimConfigError(f"{prefix}{extra[0]}",
                             f"unknown key; expected one of {sorted(allowed)}")


def join(parent: str, key: str) -> str:
    """A dotted field path."""
    return f"{parent}.{key}" if parent else key
