"""Each part's public surface: a short ``__all__`` whose every name resolves and is documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

PARTS = ["kv", "sched", "engine", "ops", "limit", "route", "metrics", "protocol", "server",
         "client"]


def _public(part: str) -> list[tuple[str, object]]:
    module = importlib.import_module(f"servekit.{part}")
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("part", PARTS)
def test_every_exported_name_resolves_and_has_a_docstring(part: str) -> None:
    undocumented = []
    for name, obj in _public(part):
        if inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__")  # its own, not inherited
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = obj.__doc__
        else:
            doc = None  # constants and aliases belong in their modules, not in __all__
        if not (doc and doc.strip()):
            undocumented.append(name)
    assert undocumented == []


@pytest.mark.parametrize("part", PARTS)
def test_a_part_exports_about_a_dozen_names(part: str) -> None:
    names = [name for name, _ in _public(part)]
    assert len(names) == len(set(names))
    # the client also carries openai-python's eleven exception names; route and limit the
    # types their plugin protocols take (Candidate, RouteRequest, LimitSet, ...)
    assert len(names) <= 20, names


@pytest.mark.parametrize(("part", "name", "module"), [
    ("route", "xxh3_64", "servekit.route.hashing"),
    ("metrics", "NewTokens", "servekit.metrics.events"),
    ("limit", "StoreFullError", "servekit.limit.errors"),
    ("sched", "make_policy", "servekit.sched.policy"),
    ("client", "Usage", "servekit.client.types"),
])
def test_a_name_that_left_a_namespace_still_resolves_for_one_release(part: str, name: str,
                                                                     module: str) -> None:
    package = importlib.import_module(f"servekit.{part}")
    assert name not in package.__all__
    with pytest.warns(DeprecationWarning, match=module):
        value = getattr(package, name)
    assert value is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018
