"""Plugin discovery through real entry points of a distribution written to a temp dir."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from servekit import plugins
from servekit.metrics import Hook, PrometheusHook, StatsHook
from servekit.plugins import (
    AmbiguousPluginError,
    PluginLoadError,
    PluginTypeError,
    UnknownPluginError,
    UnknownPluginKindError,
)


def install(root: Path, dist: str, entry_points: dict[str, str], module: str = "") -> None:
    """Write a minimal installed distribution (dist-info with entry points) under ``root``."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    info.joinpath("entry_points.txt").write_text(f"[servekit.plugins]\n{lines}\n")
    if module:
        root.joinpath(f"{dist}_plugin.py").write_text(textwrap.dedent(module))


PLUGIN = """
from servekit.metrics import Hook

class CountingHook(Hook):
    def __init__(self, start=0):
        self.n = start
    def on_new_tokens(self, event):
        self.n += event.num_tokens

def make_hook():
    return CountingHook(10)

class NotAHook:
    pass

def bad_factory():
    return object()

POLICY = "fcfs-like"
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_available_without_entry_points() -> None:
    names = {(s.kind, s.name) for s in plugins.available()}
    assert {("exporter", "prometheus"), ("exporter", "otel"), ("hook", "stats")} <= names
    assert plugins.load("hook", "stats") is StatsHook
    hook = plugins.create("exporter", "prometheus", model_name="m")
    assert isinstance(hook, PrometheusHook)


def test_entry_point_plugins_load_and_create(site: Path) -> None:
    install(site, "acme", {
        "hook.counting": "acme_plugin:CountingHook",
        "hook.factory": "acme_plugin:make_hook",
        "policy.fcfs_like": "acme_plugin:POLICY",
        "no_dot": "acme_plugin:POLICY",  # malformed: ignored with a warning
    }, PLUGIN)  # fmt: skip
    specs = {(s.kind, s.name): s for s in plugins.available()}
    assert specs["hook", "counting"].source == "acme"
    assert specs["hook", "counting"].target == "acme_plugin:CountingHook"
    assert [s.name for s in plugins.available("policy")] == ["fcfs_like"]
    assert plugins.load("policy", "fcfs_like") == "fcfs-like"
    hook = plugins.create("hook", "counting", 5)
    assert isinstance(hook, Hook) and hook.n == 5
    assert plugins.create("hook", "factory").n == 10


def test_clear_errors(site: Path) -> None:
    install(site, "acme", {
        "hook.not_a_hook": "acme_plugin:NotAHook",
        "hook.bad_factory": "acme_plugin:bad_factory",
        "hook.missing_module": "no_such_module_xyz:Thing",
        "hook.missing_attr": "acme_plugin:Nope",
        "policy.dup": "acme_plugin:POLICY",
        "exporter.prometheus": "acme_plugin:NotAHook",  # shadows a built-in: ignored
    }, PLUGIN)  # fmt: skip
    install(site, "other", {"policy.dup": "acme_plugin:POLICY"})
    with pytest.raises(UnknownPluginKindError, match=r"known kinds: .*exporter"):
        plugins.load("nonsense", "x")
    with pytest.raises(
        UnknownPluginError, match=r"no hook plugin named 'nope'; available: .*stats"
    ):
        plugins.load("hook", "nope")
    with pytest.raises(UnknownPluginError, match="none installed"):
        plugins.load("limiter_store", "redis2")
    with pytest.raises(PluginTypeError, match=r"must be a servekit\.metrics\.Hook"):
        plugins.load("hook", "not_a_hook")
    with pytest.raises(PluginTypeError, match="bad_factory"):
        plugins.create("hook", "bad_factory")
    with pytest.raises(PluginLoadError, match=r"no_such_module_xyz.*acme") as info:
        plugins.load("hook", "missing_module")
    assert isinstance(info.value, ImportError)
    with pytest.raises(PluginLoadError, match="Nope"):
        plugins.load("hook", "missing_attr")
    with pytest.raises(AmbiguousPluginError, match=r"acme.*other|other.*acme"):
        plugins.load("policy", "dup")
    with pytest.raises(PluginTypeError, match="not callable"):
        install(site, "third", {"policy.value": "acme_plugin:POLICY"})
        plugins.create("policy", "value")
    assert plugins.load("exporter", "prometheus") is PrometheusHook
