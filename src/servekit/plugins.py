"""Plugins: the extension points, and how a name becomes a plugin.

servekit has seven extension points ("kinds"), each an interface with a documented contract:

=================  ==========================================================  ===
kind               interface                                                   api
=================  ==========================================================  ===
``policy``         :class:`servekit.sched.policy.SchedulingPolicy`             1
``victim_policy``  :class:`servekit.sched.policy.VictimPolicy`                 1
``limiter_store``  :class:`servekit.limit.store.Store`                         1
``routing_policy`` :class:`servekit.route.policy.RoutingPolicy`                1
``hook``           :class:`servekit.metrics.hooks.Hook` (exporters are hooks)  1
``usage_sink``     :class:`servekit.usage.sink.UsageSink`                      1
``runner``         :class:`servekit.engine.runner.Runner` (the model runner)   1
=================  ==========================================================  ===

**Versions.** Each interface has a version, ``KINDS[kind].api_version`` (the column above). It
changes only when the contract changes incompatibly. A plugin may declare the version it
implements with a class (or instance) attribute ``api_version``; without one it is taken to
implement version 1. A plugin declaring a version this servekit does not implement is refused
with :class:`PluginVersionError` naming both.

**Names.** A distribution adds a plugin with an entry point ``<kind>.<name>`` in the group
``servekit.plugins``::

    [project.entry-points."servekit.plugins"]
    "hook.statsd" = "my_pkg.statsd:StatsdHook"
    "policy.deadline" = "my_pkg.sched:DeadlinePolicy"

servekit's own plugins are listed in :data:`BUILTIN` under the same ``kind.name`` scheme and are
found by the same :func:`find`, so built-in and third-party plugins take one path: a spec
``NAME`` or ``NAME:{"json": "object"}`` (:func:`parse_spec`) names the plugin, the JSON object
becomes keyword arguments, and :func:`create` imports the target and calls it. Nothing is
cached: each call reads the installed distributions' metadata.

Errors name the plugin and the cause: :class:`UnknownPluginError` (no such name; the message
lists the installed ones), :class:`PluginLoadError` (its import failed),
:class:`PluginArgumentError` (bad spec or arguments), :class:`PluginTypeError` (the target is
not what its kind requires), :class:`PluginVersionError`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from typing import Any

from attrs import frozen

from servekit.errors import ServekitError

logger = logging.getLogger("servekit.plugins")

GROUP = "servekit.plugins"


@frozen(slots=True)
class Kind:
    """One extension point: its interface (``module:Class``) and the version servekit speaks."""

    name: str
    interface: str
    api_version: int
    description: str


#: The extension points, by kind name.
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("policy", "servekit.sched.policy:SchedulingPolicy", 1, "scheduling policy"),
        Kind("victim_policy", "servekit.sched.policy:VictimPolicy", 1,
             "preemption-victim policy"),
        Kind("limiter_store", "servekit.limit.store:Store", 1, "rate-limiter store"),
        Kind("routing_policy", "servekit.route.policy:RoutingPolicy", 1, "routing policy"),
        Kind("hook", "servekit.metrics.hooks:Hook", 1, "metrics hook or exporter"),
        Kind("usage_sink", "servekit.usage.sink:UsageSink", 1, "usage-record sink"),
        Kind("runner", "servekit.engine.runner:Runner", 1, "model runner"),
    )
}

#: servekit's own plugins, ``(kind, name) -> "module:attribute"``.
BUILTIN: dict[tuple[str, str], str] = {
    ("policy", "fcfs"): "servekit.sched.policy:FCFSPolicy",
    ("policy", "priority"): "servekit.sched.policy:PriorityPolicy",
    ("policy", "fair"): "servekit.sched.policy:FairSharePolicy",
    ("victim_policy", "newest"): "servekit.sched.policy:NewestVictimPolicy",
    ("victim_policy", "lowest_priority"): "servekit.sched.policy:LowestPriorityVictimPolicy",
    ("limiter_store", "memory"): "servekit.limit.store:MemoryStore",
    ("limiter_store", "redis"): "servekit.limit.redis:RedisStore",
    ("limiter_store", "rediss"): "servekit.limit.redis:RedisStore",
    ("limiter_store", "unix"): "servekit.limit.redis:RedisStore",
    ("routing_policy", "consistent_hash"): "servekit.route.policy:ConsistentHashPolicy",
    ("routing_policy", "cache_aware"): "servekit.route.cache_aware:CacheAwarePolicy",
    ("routing_policy", "least_loaded"): "servekit.route.policy:LeastLoadedPolicy",
    ("routing_policy", "power_of_two"): "servekit.route.policy:PowerOfTwoChoicesPolicy",
    ("routing_policy", "round_robin"): "servekit.route.policy:RoundRobinPolicy",
    ("hook", "stats"): "servekit.metrics.stats:StatsHook",
    ("hook", "request_log"): "servekit.metrics.logs:RequestLogHook",
    ("hook", "step_log"): "servekit.metrics.logs:StepLogHook",
    ("hook", "prometheus"): "servekit.metrics.prometheus:PrometheusHook",
    ("hook", "otel"): "servekit.metrics.otel:OtelHook",
    ("runner", "transformers"): "servekit.engine.runner:ModelRunner",
}


#: Former kind names, read as the kind they merged into (exporters are hooks).
KIND_ALIASES: dict[str, str] = {"exporter": "hook"}


class PluginError(ServekitError):
    """Base class of plugin discovery and loading errors."""


class UnknownPluginKindError(PluginError, ValueError):
    """The requested kind is not one of :data:`KINDS`."""


class UnknownPluginError(PluginError, LookupError, ValueError):
    """No plugin of the requested kind has the requested name."""


class AmbiguousPluginError(PluginError, LookupError):
    """Several distributions register the same ``kind.name``."""


class PluginLoadError(PluginError, ImportError):
    """Importing the plugin's target failed."""


class PluginTypeError(PluginError, TypeError):
    """The plugin's target is not what its kind requires."""


class PluginArgumentError(PluginError, ValueError):
    """A plugin spec is malformed, or the plugin rejected its arguments."""


class PluginVersionError(PluginError, TypeError):
    """The plugin implements an interface version this servekit does not."""


@frozen(slots=True)
class PluginSpec:
    """One discovered plugin: where it points and who provides it."""

    kind: str
    name: str
    target: str  #: ``module:attribute``
    source: str  #: the distribution's name (``"servekit"`` for built-ins)
    version: str  #: the distribution's version


def _servekit_version() -> str:
    try:
        return version("servekit")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def _discovered() -> list[PluginSpec]:
    own = _servekit_version()
    specs = [PluginSpec(k, n, t, "servekit", own) for (k, n), t in BUILTIN.items()]
    for ep in entry_points(group=GROUP):
        kind, dot, name = ep.name.partition(".")
        if not dot or not kind or not name:
            logger.warning(
                "ignoring entry point %r in %s: name must be 'kind.name'", ep.name, GROUP
            )
            continue
        kind = KIND_ALIASES.get(kind, kind)
        if (kind, name) in BUILTIN:
            if _dist(ep) != ("servekit", own):
                logger.warning("ignoring entry point %r: the name is taken by a built-in",
                               ep.name)
            continue
        source, dist_version = _dist(ep)
        specs.append(PluginSpec(kind, name, ep.value, source, dist_version))
    return specs


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or "<unknown distribution>"
    return str(name), str(getattr(dist, "version", None) or "unknown")


def available(kind: str | None = None) -> list[PluginSpec]:
    """Installed and built-in plugins, sorted by kind and name; only ``kind``'s when given."""
    specs = [s for s in _discovered() if kind is None or s.kind == kind]
    return sorted(specs, key=lambda s: (s.kind, s.name, s.source))


def find(kind: str, name: str) -> PluginSpec:
    """The plugin ``kind.name``, with an error listing the alternatives when there is none."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise UnknownPluginKindError(
            f"unknown plugin kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}"
        )
    of_kind = [s for s in _discovered() if s.kind == kind]
    matches = [s for s in of_kind if s.name == name]
    if not matches:
        names = ", ".join(sorted({s.name for s in of_kind})) or "none installed"
        raise UnknownPluginError(f"no {kind} plugin named {name!r}; available: {names}")
    if len(matches) > 1:
        sources = ", ".join(f"{s.source} ({s.target})" for s in matches)
        raise AmbiguousPluginError(f"{kind} plugin {name!r} is registered by several: {sources}")
    return matches[0]


def load(kind: str, name: str) -> Any:
    """Import and return the object plugin ``kind.name`` points to (a class or a factory)."""
    spec = find(kind, name)
    target = _load(spec)
    _check(target, spec, created=False)
    return target


def create(kind: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Load plugin ``kind.name``, call it with the given arguments and return the result.

    An exception from the call (an unknown keyword, a bad value) becomes
    :class:`PluginArgumentError` naming the plugin and the cause.
    """
    spec = find(kind, name)
    target = _load(spec)
    _check(target, spec, created=False)
    if not callable(target):
        raise PluginTypeError(f"{kind} plugin {name!r} ({spec.target}) is not callable")
    try:
        obj = target(*args, **kwargs)
    except Exception as exc:  # whatever the plugin raises, the message names it and the cause
        raise PluginArgumentError(
            f"{kind} plugin {name!r} ({spec.source}) rejected its arguments "
            f"{_show_args(args, kwargs)}: {type(exc).__name__}: {exc}"
        ) from exc
    _check(obj, spec, created=True)
    return obj


def parse_spec(text: str, *, what: str = "plugin") -> tuple[str, dict[str, Any]]:
    """``"NAME"`` or ``"NAME:{...}"`` -> ``(name, kwargs)``; the JSON must be an object.

    ``what`` names the setting in the error (e.g. ``"--policy"``).
    """
    name, colon, raw = text.partition(":")
    name = name.strip()
    if not name:
        raise PluginArgumentError(f"{what}: empty plugin name in {text!r}")
    if not colon:
        return name, {}
    try:
        kwargs = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PluginArgumentError(
            f"{what}: the arguments of plugin {name!r} are not valid JSON ({exc}): {raw!r}"
        ) from exc
    if not isinstance(kwargs, dict):
        raise PluginArgumentError(
            f"{what}: the arguments of plugin {name!r} must be a JSON object, got {raw!r}"
        )
    return name, kwargs


def resolve(kind: str, value: Any, *, what: str | None = None) -> Any:
    """A plugin of ``kind`` from a spec string (see :func:`parse_spec`), a
    ``(name, kwargs)`` pair, or an instance (returned as is)."""
    if isinstance(value, str):
        name, kwargs = parse_spec(value, what=what or kind)
        return create(kind, name, **kwargs)
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], Mapping)):
        return create(kind, value[0], **dict(value[1]))
    return value


def _show_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"({', '.join(shown)})"


def _load(spec: PluginSpec) -> Any:
    module_name, _, attr = spec.target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # an import may fail with anything: name the plugin
        raise PluginLoadError(
            f"cannot load {spec.kind} plugin {spec.name!r} from {spec.target!r} "
            f"({spec.source}): {type(exc).__name__}: {exc}"
        ) from exc
    return obj


def _check(obj: Any, spec: PluginSpec, *, created: bool) -> None:
    """Refuse a plugin that declares another interface version, or a hook that is none."""
    kind = KINDS[spec.kind]
    declared = getattr(obj, "api_version", 1)
    if isinstance(declared, int) and declared != kind.api_version:
        raise PluginVersionError(
            f"{spec.kind} plugin {spec.name!r} ({spec.target}, {spec.source}) implements "
            f"{kind.interface} version {declared}; this servekit implements version "
            f"{kind.api_version}"
        )
    if spec.kind == "hook":
        from servekit.metrics.hooks import Hook

        if isinstance(obj, Hook) or (isinstance(obj, type) and issubclass(obj, Hook)):
            return
        if not created and callable(obj) and not isinstance(obj, type):
            return  # a factory: its product is checked by create()
        raise PluginTypeError(
            f"hook plugin {spec.name!r} ({spec.target}, {spec.source}) must be a "
            f"servekit.metrics.Hook, got {obj!r}"
        )
