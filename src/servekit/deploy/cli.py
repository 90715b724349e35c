"""``servekit ray-serve``: servekit as a Ray Serve application (imports Ray only to run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from servekit.errors import MissingExtraError
from servekit.server.config import ConfigError, apply_config


def add_ray_parser(sub: Any) -> None:
    """Add ``ray-serve`` to the ``servekit`` parser's subparsers. Every setting of the
    ``--config`` file applies (``[ray]`` and ``servekit serve``'s); flags override it."""
    ray = sub.add_parser("ray-serve", help="serve on a Ray cluster (Ray Serve application)")
    ray.add_argument("--config", type=Path, default=None,
                     help="servekit.toml: [engine], [server], [limits], ... and [ray]")
    ray.add_argument("--address", default=None,
                     help="Ray cluster address (default: ray.address, else a local Ray)")
    ray.add_argument("--replicas", type=int, default=None, help="engine replicas")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale the engine replicas up to this many (ray.max_replicas)")
    ray.add_argument("--routing-policy", default=None, metavar="NAME[:JSON]",
                     help="cache_aware (default), least_loaded, power_of_two, "
                          "consistent_hash, round_robin, a plugin's name, or ray (Ray "
                          "Serve's own router)")
    ray.add_argument("--model", type=Path, default=None)
    ray.add_argument("--fake", action="store_true", default=None,
                     help="instant fake replicas (smoke tests)")
    ray.add_argument("--host", default=None)
    ray.add_argument("--port", type=int, default=None)


def run_ray_serve(args: argparse.Namespace) -> int:
    """Check the settings, then deploy and serve until interrupted; 2 on a bad setting."""
    try:
        from servekit.deploy.ray import check_settings, run
        from servekit.deploy.ray.config import ALL_SETTINGS
    except MissingExtraError as exc:
        print(f"servekit ray-serve: {exc}", file=sys.stderr)
        return 2
    try:
        settings = check_settings(apply_config(args, ALL_SETTINGS))
    except ConfigError as exc:
        print(f"servekit ray-serve: {exc}", file=sys.stderr)
        return 2
    return run(settings)
