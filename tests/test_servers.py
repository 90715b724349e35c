"""The external-server rule: missing means skipped with a reason, except under CI=true."""

from __future__ import annotations

import pytest

from ._servers import require_binary, require_module

ABSENT = "servekit-no-such-server-binary"


def test_a_missing_server_skips_with_a_reason_that_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT} is not installed .apt-get install x"):
        require_binary(ABSENT, "apt-get install x")
    with pytest.raises(pytest.skip.Exception, match="servekit_no_such_module"):
        require_module("servekit_no_such_module", "pip install it")


def test_under_ci_a_missing_server_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary(ABSENT, "apt-get install x")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_module("servekit_no_such_module", "pip install it")


def test_a_present_server_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_binary("sh", "it is part of every Linux").endswith("/sh")
    assert require_module("json", "it is in the standard library").dumps([]) == "[]"
