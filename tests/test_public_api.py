"""The top-level package: every re-exported name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import servekit


@pytest.mark.parametrize("name", sorted(servekit._EXPORTS))
def test_every_export_resolves_to_the_subpackage_object(name: str) -> None:
    import importlib

    value = getattr(servekit, name)
    assert value is getattr(importlib.import_module(servekit._EXPORTS[name]), name)
    assert name in dir(servekit)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        servekit.no_such_name  # noqa: B018


def test_import_servekit_loads_no_torch_and_no_extras() -> None:
    code = ("import sys, servekit; servekit.Limiter; servekit.HashRing; servekit.Scheduler; "
            "print(sorted(m for m in ('torch', 'fastapi', 'grpc', 'redis', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
