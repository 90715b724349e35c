"""Build and run the Ray Serve application: ingress -> replica deployment, servekit's router."""

from __future__ import annotations

import argparse
import logging
import signal
import warnings
from collections.abc import Mapping
from typing import Any, cast

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from servekit.deploy.ray.autoscale import ServekitAutoscalingPolicy
from servekit.deploy.ray.config import RAY_DEFAULT_ROUTER, from_mapping, load_settings
from servekit.deploy.ray.ingress import OpenAIIngress
from servekit.deploy.ray.replica import EngineReplica
from servekit.deploy.ray.router import SENT_TTL, ServekitRequestRouter

__all__ = ["autoscaling_config", "build_app", "run"]

logger = logging.getLogger("servekit.deploy")


def build_app(args: Mapping[str, Any] | argparse.Namespace | None = None) -> Any:
    """The application (a bound ingress deployment) the settings describe.

    ``args`` is a checked settings namespace (:func:`~servekit.deploy.ray.config.load_settings`),
    or ``serve run``'s arguments: ``serve run servekit.deploy.ray:build_app
    config=servekit.toml`` (any other ``key=value`` overrides that setting). A bad setting
    raises :class:`~servekit.server.config.ConfigError` naming its key, before anything is
    deployed.
    """
    if args is None:
        args = load_settings()
    elif not isinstance(args, argparse.Namespace):
        args = from_mapping(args)
    settings = vars(args).copy()
    router_options: dict[str, Any] = {  # RequestRouterConfig's stub types each kwarg as a dict
        "request_router_class":
            f"{ServekitRequestRouter.__module__}.{ServekitRequestRouter.__name__}",
        "request_router_kwargs": {"policy": args.routing_policy, "block_size": args.block_size,
                                  "prefix_blocks": args.prefix_blocks,
                                  "sent_ttl": max(SENT_TTL, 4 * args.routing_stats_period),
                                  # one ingress: its router's in-flight counts are exact
                                  "reported_load": args.ingress_replicas > 1},
        "request_routing_stats_period_s": args.routing_stats_period,
    }
    # "ray": Ray Serve's own default router (power of two choices on queue length)
    router = ({} if args.routing_policy == RAY_DEFAULT_ROUTER
              else {"request_router_config": RequestRouterConfig(**router_options)})
    # serve.deployment turns the classes into Deployments (the stubs keep the class type)
    scaling = ({"num_replicas": args.replicas} if args.max_replicas is None
               else {"autoscaling_config": autoscaling_config(args)})
    replica = cast(Any, EngineReplica).options(
        **scaling, max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        **router,
    ).bind(settings)
    return cast(Any, OpenAIIngress).options(
        num_replicas=args.ingress_replicas, max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.ingress_cpus},
    ).bind(replica, settings)


def autoscaling_config(args: argparse.Namespace) -> AutoscalingConfig:
    """Ray's autoscaling config of the engine replicas: :class:`ServekitAutoscalingPolicy`
    between ``min_replicas`` (default ``replicas``) and ``max_replicas``, starting at
    ``replicas``; metrics every ``autoscaling_interval`` s, averaged over 3 intervals."""
    policy = AutoscalingPolicy(policy_function=ServekitAutoscalingPolicy, policy_kwargs={
        "target_requests": (args.target_requests if args.target_requests is not None
                            else float(args.max_num_seqs)),
        "target_kv_usage": args.target_kv_usage})
    with warnings.catch_warnings():  # metrics_interval_s is Ray's (deprecated) only knob per app
        warnings.simplefilter("ignore", DeprecationWarning)
        return AutoscalingConfig(
            min_replicas=args.min_replicas if args.min_replicas is not None else args.replicas,
            initial_replicas=args.replicas, max_replicas=args.max_replicas,
            metrics_interval_s=args.autoscaling_interval,
            look_back_period_s=3 * args.autoscaling_interval,
            upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
            policy=policy)


def run(args: argparse.Namespace) -> int:
    """``servekit ray-serve``: connect to (or start) Ray, deploy, serve until SIGINT/SIGTERM."""
    ray.init(address=args.address or None)
    serve.start(http_options={"host": args.host, "port": args.port})
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
    logger.info("servekit on Ray Serve: %d replica(s), routing %s, http://%s:%d%s",
                args.replicas, args.routing_policy, args.host, args.port, args.route_prefix)
    try:
        serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix,
                  blocking=True)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: take the application down, then Ray
        logger.info("interrupted: shutting down the application")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM shuts down like Ctrl-C
