"""Autoscaling the engine replicas on servekit's own load numbers, through Ray Serve.

Each :class:`~servekit.deploy.ray.replica.EngineReplica` reports its engine's load
(``record_autoscaling_stats``: ``running``, ``waiting``, ``kv_usage``, as the gateway and the
router read them); Ray Serve averages each over its look-back window and calls
:class:`ServekitAutoscalingPolicy` (a custom autoscaling policy) with them. The default policy
asks for as many replicas as the larger of

- the requests the engines hold, ``sum(running + waiting) / target_requests`` (by default
  ``target_requests`` is ``engine.max_num_seqs``: a replica whose batch is full is at target,
  anything waiting in a queue pushes past it),
- the KV cache they use, ``sum(kv_usage) / target_kv_usage`` (default 0.8: scale before the
  caches fill and requests start being preempted),
- the requests Ray itself counts (queued at handles included) over ``target_requests``,

and Ray applies its usual bounds and damping on top: ``min_replicas`` / ``max_replicas``, the
up/down-scale delays and factors of the deployment's ``AutoscalingConfig``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["AUTOSCALING_METRICS", "ServekitAutoscalingPolicy", "desired_replicas"]

#: The load numbers each replica reports to Ray's autoscaler.
AUTOSCALING_METRICS = ("running", "waiting", "kv_usage")


def desired_replicas(running: float, waiting: float, kv_usage: float, ongoing: float, *,
                     target_requests: float, target_kv_usage: float = 0.8) -> float:
    """Replicas the load asks for (a fraction: Ray rounds up and bounds it). ``running``,
    ``waiting`` and ``kv_usage`` are summed over the replicas; ``ongoing`` is Ray's own count
    of the deployment's requests."""
    return max((running + waiting) / target_requests, kv_usage / target_kv_usage,
               ongoing / target_requests)


class ServekitAutoscalingPolicy:
    """Ray Serve's custom autoscaling policy (``AutoscalingPolicy(policy_function=this class,
    policy_kwargs=...)``): :func:`desired_replicas` of the replicas' reported load."""

    def __init__(self, target_requests: float, target_kv_usage: float = 0.8) -> None:
        if target_requests <= 0 or not 0 < target_kv_usage <= 1:
            raise ValueError(f"target_requests must be > 0 and target_kv_usage in (0, 1], got "
                             f"{target_requests} and {target_kv_usage}")
        self.target_requests = target_requests
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``(replicas wanted, policy state)`` for Ray's ``AutoscalingContext``."""
        metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
        sums = {name: math.fsum(metrics.get(name, {}).values()) for name in AUTOSCALING_METRICS}
        if not metrics and not ctx.total_num_requests:  # nothing reported yet: hold
            return ctx.target_num_replicas, {}
        return desired_replicas(sums["running"], sums["waiting"], sums["kv_usage"],
                                float(ctx.total_num_requests),
                                target_requests=self.target_requests,
                                target_kv_usage=self.target_kv_usage), {}
