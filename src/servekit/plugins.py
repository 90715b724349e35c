"""Plugin discovery through the ``servekit.plugins`` entry-point group.

A distribution adds a plugin by naming an entry point ``<kind>.<name>``::

    [project.entry-points."servekit.plugins"]
    "hook.statsd" = "my_pkg.statsd:StatsdHook"
    "policy.deadline" = "my_pkg.sched:DeadlinePolicy"

:func:`load` returns the object the entry point names (usually a class or a factory);
:func:`create` also calls it. servekit's own hooks and exporters are built in under the same
names, so ``create("exporter", "prometheus", model_name="m")`` works with or without entry points.
Nothing is cached: each call reads the installed distributions' metadata.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from attrs import frozen

from servekit.errors import ServekitError

logger = logging.getLogger("servekit.plugins")

GROUP = "servekit.plugins"

#: Plugin kinds and what they are.
KINDS: dict[str, str] = {
    "hook": "metrics hook (a servekit.metrics.Hook)",
    "exporter": "metrics exporter (a servekit.metrics.Hook)",
    "policy": "scheduling policy",
    "victim_policy": "preemption victim policy",
    "limiter_store": "rate-limiter store",
    "routing_policy": "routing policy",
    "model": "model adapter",
}

_BUILTIN: dict[tuple[str, str], str] = {
    ("hook", "stats"): "servekit.metrics.stats:StatsHook",
    ("hook", "request_log"): "servekit.metrics.logs:RequestLogHook",
    ("exporter", "prometheus"): "servekit.metrics.prometheus:PrometheusHook",
    ("exporter", "otel"): "servekit.metrics.otel:OtelHook",
}
_HOOK_KINDS = frozenset({"hook", "exporter"})


class PluginError(ServekitError):
    """Base class of plugin discovery and loading errors."""


class UnknownPluginKindError(PluginError, ValueError):
    """The requested kind is neither known nor used by any installed plugin."""


class UnknownPluginError(PluginError, LookupError):
    """No plugin of the requested kind has the requested name."""


class AmbiguousPluginError(PluginError, LookupError):
    """Several distributions register the same ``kind.name``."""


class PluginLoadError(PluginError, ImportError):
    """Importing the plugin's target failed."""


class PluginTypeError(PluginError, TypeError):
    """The plugin's target is not what its kind requires."""


@frozen(slots=True)
class PluginSpec:
    """One discovered plugin: where it points and who provides it."""

    kind: str
    name: str
    target: str  #: ``module:attribute``
    source: str  #: ``"servekit"`` for built-ins, else the distribution's name


def _discovered() -> list[PluginSpec]:
    specs = [PluginSpec(k, n, t, "servekit") for (k, n), t in _BUILTIN.items()]
    for ep in entry_points(group=GROUP):
        kind, dot, name = ep.name.partition(".")
        if not dot or not kind or not name:
            logger.warning(
                "ignoring entry point %r in %s: name must be 'kind.name'", ep.name, GROUP
            )
            continue
        if (kind, name) in _BUILTIN:
            logger.warning("ignoring entry point %r: the name is taken by a built-in", ep.name)
            continue
        specs.append(PluginSpec(kind, name, ep.value, _dist_name(ep)))
    return specs


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(getattr(dist, "name", None) or "<unknown distribution>")


def available(kind: str | None = None) -> list[PluginSpec]:
    """Installed and built-in plugins, sorted by kind and name; only ``kind``'s when given."""
    specs = [s for s in _discovered() if kind is None or s.kind == kind]
    return sorted(specs, key=lambda s: (s.kind, s.name, s.source))


def find(kind: str, name: str) -> PluginSpec:
    """The plugin ``kind.name``, with an error listing the alternatives when there is none."""
    specs = _discovered()
    of_kind = [s for s in specs if s.kind == kind]
    if not of_kind and kind not in KINDS:
        raise UnknownPluginKindError(
            f"unknown plugin kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}"
        )
    matches = [s for s in of_kind if s.name == name]
    if not matches:
        names = ", ".join(sorted({s.name for s in of_kind})) or "none installed"
        raise UnknownPluginError(f"no {kind} plugin named {name!r}; available: {names}")
    if len(matches) > 1:
        sources = ", ".join(f"{s.source} ({s.target})" for s in matches)
        raise AmbiguousPluginError(f"{kind} plugin {name!r} is registered by several: {sources}")
    return matches[0]


def load(kind: str, name: str) -> Any:
    """Import and return the object plugin ``kind.name`` points to.

    Hooks and exporters must be :class:`servekit.metrics.Hook` subclasses, instances or
    factories; anything else raises :class:`PluginTypeError`.
    """
    return _load(find(kind, name))


def create(kind: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Load plugin ``kind.name`` and call it with the given arguments; return the result."""
    spec = find(kind, name)
    target = _load(spec)
    if not callable(target):
        raise PluginTypeError(f"{kind} plugin {name!r} ({spec.target}) is not callable")
    obj = target(*args, **kwargs)
    if kind in _HOOK_KINDS:
        _check_hook(obj, spec, allow_factory=False)
    return obj


def _load(spec: PluginSpec) -> Any:
    module_name, _, attr = spec.target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(
            f"cannot load {spec.kind} plugin {spec.name!r} from {spec.target!r} "
            f"({spec.source}): {exc}"
        ) from exc
    if spec.kind in _HOOK_KINDS:
        _check_hook(obj, spec, allow_factory=True)
    return obj


def _check_hook(obj: Any, spec: PluginSpec, *, allow_factory: bool) -> None:
    from servekit.metrics.hooks import Hook

    if isinstance(obj, Hook) or (isinstance(obj, type) and issubclass(obj, Hook)):
        return
    if allow_factory and callable(obj) and not isinstance(obj, type):
        return
    raise PluginTypeError(
        f"{spec.kind} plugin {spec.name!r} ({spec.target}, {spec.source}) must be a "
        f"servekit.metrics.Hook, got {obj!r}"
    )
