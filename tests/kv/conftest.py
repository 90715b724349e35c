"""The ``speedups`` fixture: run a test under the C core and under the pure-Python loops."""

from __future__ import annotations

import pytest

from servekit.kv.blocks import speedups_available


@pytest.fixture(params=[pytest.param(True, id="c"), pytest.param(False, id="python")])
def speedups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """True: pools built with the default ``speedups=None`` use the C core (skipped when it is
    not built); False: ``SERVEKIT_NO_SPEEDUPS=1`` makes them use the pure-Python loops."""
    if request.param:
        if not speedups_available():
            pytest.skip("servekit.kv._cpool (the optional C core) is not built")
        monkeypatch.delenv("SERVEKIT_NO_SPEEDUPS", raising=False)
    else:
        monkeypatch.setenv("SERVEKIT_NO_SPEEDUPS", "1")
    return bool(request.param)
