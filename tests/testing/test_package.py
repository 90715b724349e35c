"""servekit.testing as a package: its extra, its lazy FakeEngine, what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def test_importing_without_hypothesis_names_the_extra() -> None:
    out = _run(
        "import sys; sys.modules['hypothesis'] = None\n"
        "try:\n    import servekit.testing\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    assert out.startswith("MissingExtraError") and "servekit[testing]" in out


def test_kits_and_harness_load_no_torch_and_no_server() -> None:
    out = _run(
        "import sys, servekit.testing, servekit.bench.__main__\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'servekit.server') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_fake_engine_is_reexported_lazily() -> None:
    import servekit.testing
    from servekit.server.fake import FakeEngine

    assert servekit.testing.FakeEngine is FakeEngine
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        servekit.testing.Nope  # noqa: B018
