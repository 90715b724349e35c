"""servekit as a Ray Serve application (``pip install 'servekit[ray]'``).

- :class:`EngineReplica`: one engine per replica (the demo model, ``--model`` or the fake),
  exposing ``generate`` (streamed), ``abort``, ``load`` and ``info`` through Ray handles.
- :class:`OpenAIIngress`: the reference server's OpenAI app (same endpoints, errors, keys,
  limits, usage and ``/metrics`` code) over a :class:`ReplicaEngine`, an engine-like proxy
  that streams from the replica handle.
- :class:`ServekitRequestRouter`: servekit's routing policies (cache-aware by default) as Ray
  Serve's custom request router, fed by the replicas' routing stats (load, held KV blocks).
- :class:`IngressCollector`: what the ingress adds to ``/metrics`` (failovers by reason, each
  engine replica's reported load and prefix-cache counters).
- :class:`ServekitAutoscalingPolicy`: Ray Serve's autoscaling on the engines' own load
  (requests running and waiting, KV usage), when ``ray.max_replicas`` is set.
- :func:`build_app`: the application from a ``servekit.toml`` (``serve run
  servekit.deploy.ray:build_app config=servekit.toml`` works too).

The request-router interface is a Ray developer API: the extra pins ``ray[serve]`` to the
tested range.
"""

from servekit._optional import require

require("ray.serve", "ray")

from servekit.deploy.ray.app import autoscaling_config, build_app, run
from servekit.deploy.ray.autoscale import ServekitAutoscalingPolicy, desired_replicas
from servekit.deploy.ray.config import RAY_SETTINGS, check_settings, load_settings
from servekit.deploy.ray.ingress import OpenAIIngress
from servekit.deploy.ray.metrics import IngressCollector
from servekit.deploy.ray.proxy import ReplicaEngine
from servekit.deploy.ray.replica import EngineReplica
from servekit.deploy.ray.router import ServekitRequestRouter

__all__ = [
    "RAY_SETTINGS",
    "EngineReplica",
    "IngressCollector",
    "OpenAIIngress",
    "ReplicaEngine",
    "ServekitAutoscalingPolicy",
    "ServekitRequestRouter",
    "autoscaling_config",
    "build_app",
    "check_settings",
    "desired_replicas",
    "load_settings",
    "run",
]
