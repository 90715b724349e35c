"""Deploying a servekit application on the session's local Ray, and reading its replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def deployed(ray_serve: Any, home: Path, toml: str, name: str) -> Iterator[str]:
    """Deploy the application of ``toml`` (written to ``home``/servekit.toml) as ``name``;
    yield its base URL; delete it after."""
    from servekit.deploy.ray import build_app

    serve, port = ray_serve
    path = home / "servekit.toml"
    path.write_text(toml)
    serve.run(build_app({"config": str(path)}), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # not waiting: its replicas drain for Ray's 2 s wait loop while the next module deploys
        # (each app has its own name and actors; the session's serve.shutdown ends the rest)
        serve.delete(name, _blocking=False)


def replica_actors(app: str, deployment: str = "EngineReplica") -> list[str]:
    """The actor names of ``app``'s live ``deployment`` replicas."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"::{app}#{deployment}#" in a["name"]]


def replica_stats(app: str) -> dict[str, dict[str, Any]]:
    """Each live engine replica's own routing stats (requests served, load), by replica id."""
    import ray
    from ray.exceptions import RayError

    stats = {}
    for name in replica_actors(app):
        try:
            one = ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote(),
                          timeout=10)
        except (RayError, ValueError):  # died since it was listed, or still starting
            continue
        stats[one["replica"]] = {**one, "actor": name}
    return stats


def wait_for_replicas(app: str, n: int, timeout: float = 90) -> dict[str, dict[str, Any]]:
    """``app``'s replica stats once ``n`` replicas answer (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = replica_stats(app)
        if len(stats) >= n:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"{n} replicas not up in {timeout} s: {replica_stats(app)}")
