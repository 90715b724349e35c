"""The ``[ray]`` settings of ``servekit.toml``, and the checks that make a bad one fail fast.

Every other section is ``servekit serve``'s (:data:`servekit.server.config.SETTINGS`): the
replicas build their engine from ``[engine]``, the ingress its keys, limits, usage and metrics
from ``[server]``, ``[limits]``, ``[usage]``, ``[metrics]`` and ``hooks``::

    [engine]
    model = "/models/my-llama"      # on every node that runs a replica

    [limits]
    store = "redis://10.0.0.2:6379/0"   # shared by every ingress replica

    [ray]
    address = "auto"                # join a running cluster (ray start --head / --address)
    replicas = 4
    replica_gpus = 1
    routing_policy = "cache_aware"
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from servekit.route.policy import make_routing_policy
from servekit.server.cli import build_plugins
from servekit.server.config import SETTINGS, ConfigError, Setting, apply_config, build_checked
from servekit.server.config import origin_of as _origin

__all__ = ["ALL_SETTINGS", "RAY_DEFAULT_ROUTER", "RAY_SETTINGS", "check_settings", "load_settings"]

#: ``ray.routing_policy`` naming Ray Serve's own default router instead of servekit's.
RAY_DEFAULT_ROUTER = "ray"

#: The settings only ``servekit ray-serve`` takes.
RAY_SETTINGS: tuple[Setting, ...] = (
    Setting("address", "ray.address", "str", flag="--address"),
    Setting("app_name", "ray.app_name", "str", "servekit", flag="--app-name"),
    Setting("route_prefix", "ray.route_prefix", "str", "/", flag="--route-prefix"),
    Setting("replicas", "ray.replicas", "int", 1, flag="--replicas"),
    Setting("ingress_replicas", "ray.ingress_replicas", "int", 1, flag="--ingress-replicas"),
    Setting("replica_cpus", "ray.replica_cpus", "float", 1.0, flag="--replica-cpus"),
    Setting("replica_gpus", "ray.replica_gpus", "float", 0.0, flag="--replica-gpus"),
    Setting("ingress_cpus", "ray.ingress_cpus", "float", 1.0, flag="--ingress-cpus"),
    Setting("max_ongoing_requests", "ray.max_ongoing_requests", "int", 1024,
            flag="--max-ongoing-requests"),
    Setting("routing_policy", "ray.routing_policy", "spec", "cache_aware",
            flag="--routing-policy"),
    Setting("prefix_blocks", "ray.prefix_blocks", "int", 4, flag="--prefix-blocks"),
    Setting("routing_stats_period", "ray.routing_stats_period", "float", 1.0,
            flag="--routing-stats-period"),
    # autoscaling (on when max_replicas is set): servekit.deploy.ray.autoscale
    Setting("min_replicas", "ray.min_replicas", "int", flag="--min-replicas"),
    Setting("max_replicas", "ray.max_replicas", "int", flag="--max-replicas"),
    Setting("target_requests", "ray.target_requests", "float", flag="--target-requests"),
    Setting("target_kv_usage", "ray.target_kv_usage", "float", 0.8, flag="--target-kv-usage"),
    Setting("upscale_delay", "ray.upscale_delay", "float", 30.0, flag="--upscale-delay"),
    Setting("downscale_delay", "ray.downscale_delay", "float", 600.0, flag="--downscale-delay"),
    Setting("autoscaling_interval", "ray.autoscaling_interval", "float", 10.0,
            flag="--autoscaling-interval"),
)

#: Everything ``servekit.toml`` may hold for ``servekit ray-serve``.
ALL_SETTINGS: tuple[Setting, ...] = SETTINGS + RAY_SETTINGS


def load_settings(config: str | Path | None = None, **overrides: Any) -> argparse.Namespace:
    """The settings of ``config`` (a TOML file) with ``overrides`` (``dest=value``) over it and
    the defaults under it, checked (:func:`check_settings`); :class:`ConfigError` names the
    bad key."""
    dests = {s.dest for s in ALL_SETTINGS}
    unknown = sorted(set(overrides) - dests)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(dests))}")
    args = argparse.Namespace(config=Path(config) if config is not None else None,
                              **{d: overrides.get(d) for d in dests})
    return check_settings(apply_config(args, ALL_SETTINGS))


def from_mapping(options: Mapping[str, Any]) -> argparse.Namespace:
    """:func:`load_settings` from ``serve run``'s ``key=value`` arguments (``config=PATH``;
    any other key is a setting's name, e.g. ``replicas=4``, its text read by the setting's
    type)."""
    options = dict(options)
    config = options.pop("config", None)
    kinds = {s.dest: s.kind for s in ALL_SETTINGS}
    values = {k: _from_text(k, kinds.get(k), v) if isinstance(v, str) else v
              for k, v in options.items()}
    return load_settings(config, **values)


def _from_text(name: str, kind: str | None, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text}: must be a number") from None
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={text}: must be true or false")
        return text.lower() in ("true", "1")
    if kind in ("str_list", "spec_list"):
        return text.split(",")
    if kind == "path":
        return Path(text)
    return text


def check_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fail fast on what would only fail on the cluster: replica counts, resources, the routing
    and scheduling policies, plugins, and a model directory that holds no model."""
    for dest, least in (("replicas", 1), ("ingress_replicas", 1), ("max_ongoing_requests", 1),
                        ("prefix_blocks", 1)):
        value = getattr(args, dest)
        if value < least:
            raise ConfigError(f"{_origin(args, dest)}: must be at least {least}, got {value}")
    for dest in ("replica_cpus", "replica_gpus", "ingress_cpus"):
        if getattr(args, dest) < 0:
            raise ConfigError(f"{_origin(args, dest)}: must be >= 0, got {getattr(args, dest)}")
    if args.routing_stats_period <= 0:
        raise ConfigError(f"{_origin(args, 'routing_stats_period')}: must be > 0 seconds, got "
                          f"{args.routing_stats_period}")
    _check_autoscaling(args)
    if args.routing_policy != RAY_DEFAULT_ROUTER:
        build_checked(args, "routing_policy", lambda: make_routing_policy(args.routing_policy))
    if not args.fake and args.model is not None:
        model = Path(args.model)
        if not (model / "config.json").is_file():
            raise ConfigError(f"{_origin(args, 'model')}: {str(model)!r} holds no model "
                              "(no config.json): give a local Hugging Face model directory")
    build_plugins(args)  # hooks, limiter store, scheduling policy, engine sizes
    return args



def _check_autoscaling(args: argparse.Namespace) -> None:
    for dest, positive in (("target_requests", True), ("autoscaling_interval", True),
                           ("upscale_delay", False), ("downscale_delay", False)):
        value = getattr(args, dest)
        if value is not None and (value <= 0 if positive else value < 0):
            raise ConfigError(f"{_origin(args, dest)}: must be {'>' if positive else '>='} 0, "
                              f"got {value}")
    if not 0 < args.target_kv_usage <= 1:
        raise ConfigError(f"{_origin(args, 'target_kv_usage')}: must be in (0, 1], got "
                          f"{args.target_kv_usage}")
    if args.min_replicas is not None and args.max_replicas is None:
        raise ConfigError(f"{_origin(args, 'min_replicas')}: autoscaling needs ray.max_replicas "
                          "too")
    if args.max_replicas is None:
        return
    least = args.min_replicas if args.min_replicas is not None else args.replicas
    if least < 0:
        raise ConfigError(f"{_origin(args, 'min_replicas')}: must be >= 0, got {least}")
    if not least <= args.replicas <= args.max_replicas:
        raise ConfigError(f"{_origin(args, 'max_replicas')}: autoscaling needs min_replicas "
                          f"({least}) <= replicas ({args.replicas}) <= max_replicas "
                          f"({args.max_replicas})")
