"""TOML loading (``tomllib`` on 3.11+, ``tomli`` from the ``sim`` extra before)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from servekit.sim.errors import SimConfigError


def load_toml(path: str | Path, field: str = "scenario") -> dict[str, Any]:
    """Parse a TOML file; errors name the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - 3.10 only
        from servekit._optional import require

        tomllib = require("tomli", "sim")
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError as exc:
        raise SimConfigError(field, f"file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SimConfigError(field, f"{path}: invalid TOML: {exc}") from exc
    return data
