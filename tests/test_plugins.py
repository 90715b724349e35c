"""Plugin discovery through real entry points of a distribution written to a temp dir."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from servekit import plugins
from servekit.metrics import Hook, PrometheusHook, StatsHook
from servekit.plugins import (
    AmbiguousPluginError,
    PluginArgumentError,
    PluginLoadError,
    PluginTypeError,
    PluginVersionError,
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

raise_on_import = False

class FutureHook(Hook):
    api_version = 2

class Policy:
    def __init__(self, depth=1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
"""

BROKEN = """
import no_such_dependency_of_the_plugin
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_available_without_entry_points() -> None:
    names = {(s.kind, s.name) for s in plugins.available()}
    assert {("hook", "prometheus"), ("hook", "otel"), ("hook", "stats")} <= names
    assert {("policy", "fcfs"), ("limiter_store", "redis"), ("routing_policy", "round_robin"),
            ("victim_policy", "newest"), ("runner", "transformers")} <= names
    assert {s.kind for s in plugins.available()} <= set(plugins.KINDS)
    assert plugins.load("hook", "stats") is StatsHook
    hook = plugins.create("hook", "prometheus", model_name="m")
    assert isinstance(hook, PrometheusHook)
    # "exporter" was merged into "hook": the old kind name still finds the hook
    assert plugins.load("exporter", "prometheus") is PrometheusHook


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
    policies = [s.name for s in plugins.available("policy") if s.source in ("servekit", "acme")]
    assert policies == ["fair", "fcfs", "fcfs_like", "priority"]
    assert specs["policy", "fcfs"].source == "servekit"
    assert (specs["hook", "counting"].version, specs["policy", "fcfs_like"].version) == (
        "1.0", "1.0")
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
        "hook.prometheus": "acme_plugin:NotAHook",  # shadows a built-in: ignored
    }, PLUGIN)  # fmt: skip
    install(site, "other", {"policy.dup": "acme_plugin:POLICY"})
    with pytest.raises(UnknownPluginKindError, match=r"known kinds: .*hook.*limiter_store"):
        plugins.load("nonsense", "x")
    with pytest.raises(
        UnknownPluginError, match=r"no hook plugin named 'nope'; available: .*stats"
    ):
        plugins.load("hook", "nope")
    with pytest.raises(UnknownPluginError, match="none installed"):
        plugins.load("usage_sink", "postgres")
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


def test_specs_arguments_and_import_failures_name_the_plugin(site: Path) -> None:
    install(site, "acme", {
        "hook.future": "acme_plugin:FutureHook",
        "hook.broken": "broken_plugin:Hook",
        "victim_policy.deep": "acme_plugin:Policy",
    }, PLUGIN)  # fmt: skip
    site.joinpath("broken_plugin.py").write_text(BROKEN)
    assert plugins.parse_spec("fcfs") == ("fcfs", {})
    assert plugins.parse_spec('fair:{"weights": {"a": 2}}') == ("fair", {"weights": {"a": 2}})
    with pytest.raises(PluginArgumentError, match=r"--policy: .*'fair'.*JSON object"):
        plugins.parse_spec("fair:[1, 2]", what="--policy")
    with pytest.raises(PluginArgumentError, match="empty plugin name"):
        plugins.parse_spec(':{"a": 1}')
    assert plugins.resolve("victim_policy", 'deep:{"depth": 3}').depth == 3
    assert plugins.resolve("victim_policy", ("deep", {"depth": 2})).depth == 2
    marker = object()
    assert plugins.resolve("victim_policy", marker) is marker  # instances pass through
    with pytest.raises(PluginArgumentError, match=r"victim_policy plugin 'deep' \(acme\).*depth"):
        plugins.resolve("victim_policy", 'deep:{"depth": 0}')
    with pytest.raises(PluginArgumentError, match=r"'deep'.*unexpected keyword argument 'width'"):
        plugins.resolve("victim_policy", 'deep:{"width": 3}')
    with pytest.raises(PluginLoadError,
                       match=r"hook plugin 'broken'.*acme.*no_such_dependency_of_the_plugin"):
        plugins.resolve("hook", "broken")
    with pytest.raises(PluginVersionError, match=r"'future'.*version 2.*implements version 1"):
        plugins.create("hook", "future")
    with pytest.raises(UnknownPluginError, match=r"no hook plugin named 'missing'"):
        plugins.resolve("hook", "missing")
