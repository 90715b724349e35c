"""The OpenAI-compatible ingress deployment: the reference server's app over the replicas.

It builds exactly what ``servekit serve`` builds from the same settings (keys, hooks, limits,
usage recorder, server config: :func:`servekit.server.cli.server_parts`) and hands them to
:func:`servekit.server.app.create_app` with a :class:`~servekit.deploy.ray.proxy.ReplicaEngine`
as the engine, so endpoints, errors, keys, limits, usage records and ``/metrics`` are the
server's own code. Ray Serve's HTTP proxy streams the SSE responses. With several ingress
replicas, rate limits hold across them when ``limits.store`` is a shared Redis. ``/metrics``
also shows the failovers and each engine replica's reported load
(:mod:`servekit.deploy.ray.metrics`).
"""

from __future__ import annotations

import argparse
from typing import Any

from ray import serve

from servekit.deploy.ray.metrics import IngressCollector, replica_reports
from servekit.deploy.ray.proxy import ReplicaEngine
from servekit.server.app import create_app
from servekit.server.cli import server_parts
from servekit.server.usage_cli import recorder_from_args

__all__ = ["OpenAIIngress"]


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    """The server's app over ``replica`` (a handle to :class:`EngineReplica`)."""

    async def __init__(self, replica: Any, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        args = argparse.Namespace(**settings)
        info = await replica.info.remote()
        self.engine = ReplicaEngine(replica, info)
        parts = server_parts(args)
        self.app_name = serve.get_replica_context().app_name
        if parts.metrics is not None:
            parts.metrics.registry.register(
                IngressCollector(lambda: self.engine.failovers,
                                 lambda: replica_reports(self.app_name)))
        self._app = create_app(self.engine, keys=parts.keys, hooks=parts.hooks,
                               limits=parts.limits,
                               metrics=parts.metrics if parts.metrics is not None else False,
                               config=parts.config, usage=recorder_from_args(args))

    def __serve_build_asgi_app__(self) -> Any:
        """Ray Serve's hook for an ASGI app built at replica start."""
        return self._app
