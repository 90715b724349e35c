"""One error scheme: every exception servekit defines ends in ``Error``, derives from
``servekit.errors.ServekitError``, and no two of them share a name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import servekit
from servekit.errors import ServekitError


def _exception_classes() -> list[type[BaseException]]:
    found: dict[int, type[BaseException]] = {}
    for info in pkgutil.walk_packages(servekit.__path__, "servekit."):
        if "grpc_gen" in info.name:  # generated code
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                found[id(obj)] = obj
    return list(found.values())


def test_every_exception_ends_in_error_and_derives_from_servekit_error() -> None:
    classes = _exception_classes()
    assert len(classes) > 40  # the walk found the parts' errors
    bad = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes
                 if not c.__name__.endswith("Error") or not issubclass(c, ServekitError))
    assert bad == []


def test_no_two_exceptions_share_a_name() -> None:
    by_name: dict[str, list[str]] = {}
    for c in _exception_classes():
        by_name.setdefault(c.__name__, []).append(f"{c.__module__}.{c.__qualname__}")
    assert {n: where for n, where in by_name.items() if len(where) > 1} == {}


def test_the_renamed_errors_keep_their_old_names_for_one_release() -> None:
    from servekit import limit, protocol, sched, server
    from servekit.sched import errors as sched_errors

    assert sched.QueueFull is sched_errors.QueueFull is sched.QueueFullError
    assert limit.RateLimitExceeded is limit.RateLimitExceededError
    assert server.AuthenticationError is protocol.errors.UnauthorizedError
    assert server.RateLimitedError is protocol.errors.TooManyRequestsError
    assert server.Usage is server.JobUsage


def test_a_deprecated_top_level_name_warns_and_resolves() -> None:
    import pytest

    from servekit.sched import QueueFullError

    with pytest.warns(DeprecationWarning, match="QueueFullError"):
        assert servekit.QueueFull is QueueFullError  # type: ignore[attr-defined]
