"""The one rule for external servers a test needs (redis-server; PostgreSQL, nginx, Ray, ...).

Tests start real servers on 127.0.0.1, never mocks. Where one is not installed, the test is
skipped with a reason that says what to install; under ``CI=true`` it fails instead, so CI can
never pass by silently skipping what it is meant to check.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from types import ModuleType

import pytest


def _missing(what: str, install: str) -> None:
    reason = f"{what} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI=true runs every test, so it must be installed")
    pytest.skip(reason)


def require_binary(name: str, install: str) -> str:
    """The path of the executable ``name``; missing: skip (fail under ``CI=true``).

    ``install`` says how to get it, e.g. ``"apt-get install redis-server"``.
    """
    path = shutil.which(name)
    if path is None:
        _missing(name, install)
        raise AssertionError("unreachable")  # pragma: no cover (skip/fail raise)
    return path


def require_module(name: str, install: str) -> ModuleType:
    """The Python package ``name`` a test's server needs (e.g. ``ray``); same rule."""
    if importlib.util.find_spec(name) is None:
        _missing(f"the Python package {name!r}", install)
    return importlib.import_module(name)
