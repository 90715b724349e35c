"""A scenario: the fleet (replicas, gateways), the step-time model, the workload, the SLO and
how long to simulate. :func:`scenario_from_dict` reads one from a TOML table (``servekit sim
SCENARIO.toml``); every error names the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import frozen

from servekit.sim._check import integer, join, known_keys, number, table
from servekit.sim._toml import load_toml
from servekit.sim.errors import SimConfigError
from servekit.sim.frontend import FrontendCost, frontend_from
from servekit.sim.specs import DeviceSpec, ModelSpec, device_spec, model_spec
from servekit.sim.steptime import ProfiledModel, RooflineModel, StepTimeModel
from servekit.sim.workload import Workload, workload_from_dict

__all__ = ["SLO", "GatewayConfig", "ReplicaConfig", "Scenario", "load_scenario",
           "scenario_from_dict"]

@frozen(slots=True)
class ReplicaConfig:
    """``count`` identical replicas, each a real Scheduler + KVCacheManager with these settings
    (``num_blocks`` None: as many as fit the device beside the weights)."""

    count: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_prefill_chunk: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    policy: str = "fcfs"
    max_waiting_requests: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None


@frozen(slots=True)
class GatewayConfig:
    """``count`` gateways, each with its own real Router (``routing``: a built-in policy or a
    plugin spec; ``load_factor`` of consistent hashing; ``cache_index``: a KV-event index of
    the replicas' blocks), sharing the rate limiter's state (as they would through Redis).
    Replicas report their load (running, waiting, KV usage) every ``sample_interval``."""

    count: int = 1
    routing: str = "consistent_hash"
    load_factor: float = 1.25
    cache_index: bool = False  # give the routers a KV-event index (cache-aware policies)


@frozen(slots=True)
class SLO:
    """Latency objectives: ``ttft`` (seconds to first token) and ``itl`` (seconds between
    tokens); a request meets the SLO when its TTFT and its mean inter-token latency do."""

    ttft: float = math.inf
    itl: float = math.inf


@frozen(slots=True)
class Scenario:
    """Everything one simulation needs.

    ``frontend_latency`` is the time the serving front end adds between the client and the
    engine (reading and tokenizing the request, streaming each token out): every token reaches
    the client that much after the engine made it, so TTFT and end-to-end latency grow by it
    and inter-token latency does not. Measure it through the server (``bench_sim.py
    --validate`` does); 0 models the engine alone.

    ``frontend`` is the front end's CPU cost (:class:`~servekit.sim.frontend.FrontendCost`),
    charged serially against each replica's time between its steps; None (the default)
    charges nothing, and requests join the scheduler the moment they arrive.
    """

    workload: Workload
    step_model: StepTimeModel
    num_blocks: int
    max_model_len: int
    replicas: ReplicaConfig = ReplicaConfig()
    gateways: GatewayConfig = GatewayConfig()
    slo: SLO = SLO()
    duration: float = 60.0
    warmup: float = 0.0
    drain: float = math.inf
    seed: int = 0
    sample_interval: float = 1.0
    vocab_size: int = 32_000
    model: ModelSpec | None = None
    device: DeviceSpec | None = None
    tp: int = 1
    frontend_latency: float = 0.0
    frontend: FrontendCost | None = None


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file (relative paths inside are relative to the file)."""
    return scenario_from_dict(load_toml(path), base=Path(path).parent)


_TOP = frozenset({"duration", "warmup", "drain", "seed", "sample_interval", "frontend_latency",
                  "frontend", "model", "device",
                  "tp", "profile", "vocab_size", "replicas", "gateways", "slo", "workload"})


def scenario_from_dict(data: Mapping[str, Any], base: str | Path | None = None) -> Scenario:
    """A :class:`Scenario` from a parsed TOML document (see docs/sim.md for the keys)."""
    known_keys("", data, _TOP)
    duration = number("duration", data.get("duration", 60.0), positive=True)
    warmup = number("warmup", data.get("warmup", 0.0), minimum=0.0)
    if warmup >= duration:
        raise SimConfigError("warmup", f"must be < duration ({duration:g}), got {warmup:g}")
    drain = math.inf if "drain" not in data else number("drain", data["drain"], minimum=0.0)
    seed = integer("seed", data.get("seed", 0), minimum=0)
    sample_interval = number("sample_interval", data.get("sample_interval", 1.0), positive=True)
    frontend = number("frontend_latency", data.get("frontend_latency", 0.0), minimum=0.0)
    replicas = replica_config(data.get("replicas", {}))
    gateways = gateway_config(data.get("gateways", {}))
    slo = slo_from(data.get("slo", {}))
    model = model_spec(data["model"]) if "model" in data else None
    device = device_spec(data["device"]) if "device" in data else None
    tp = integer("tp", data.get("tp", 1), minimum=1)
    step_model: StepTimeModel
    if "profile" in data:
        path = Path(str(data["profile"]))
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        step_model = ProfiledModel.load(path, "profile")
    elif model is not None and device is not None:
        step_model = RooflineModel(model, device, tp=tp)
    else:
        raise SimConfigError("profile", "give a step-time profile, or both model and device "
                             "for the roofline model")
    if "frontend" in data:
        frontend_cost: FrontendCost | None = frontend_from(data["frontend"])
    else:  # a profile fitted through a server carries its front end's cost
        frontend_cost = getattr(step_model, "frontend", None)
    num_blocks, max_model_len = fleet_sizes(replicas, model, step_model)
    vocab = integer("vocab_size", data.get("vocab_size", model.vocab_size if model else 32_000),
                    minimum=2)
    workload = workload_from_dict(table("workload", data.get("workload")), "workload", base)
    return Scenario(workload, step_model, num_blocks, max_model_len, replicas, gateways, slo,
                    duration, warmup, drain, seed, sample_interval, vocab, model, device, tp,
                    frontend, frontend_cost)


def fleet_sizes(replicas: ReplicaConfig, model: ModelSpec | None,
                step_model: StepTimeModel) -> tuple[int, int]:
    """KV blocks per replica and the max model length, from the config or the device."""
    if replicas.num_blocks is not None:
        num_blocks = replicas.num_blocks
    elif isinstance(step_model, RooflineModel):
        tokens = step_model.kv_capacity_tokens(replicas.gpu_memory_utilization)
        num_blocks = tokens // replicas.block_size
        if num_blocks < 1:
            raise SimConfigError("replicas.num_blocks", "no KV block fits the device")
    else:
        raise SimConfigError("replicas.num_blocks", "is required with a profiled step model")
    max_model_len = replicas.max_model_len or (model.max_model_len if model else None)
    if max_model_len is None:
        raise SimConfigError("replicas.max_model_len", "is required without a model spec")
    return num_blocks, max_model_len


def replica_config(spec: object, name: str = "replicas") -> ReplicaConfig:
    """A :class:`ReplicaConfig` from its table."""
    data = table(name, spec)
    known_keys(name, data, {
        "count", "max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "block_size",
        "num_blocks", "gpu_memory_utilization", "policy", "max_waiting_requests",
        "enable_prefix_caching", "max_model_len"})
    ints: dict[str, Any] = {}
    for key in ("count", "max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk",
                "block_size", "num_blocks", "max_waiting_requests", "max_model_len"):
        if key in data:
            ints[key] = integer(join(name, key), data[key], minimum=1)
    seqs = ints.get("max_num_seqs", 256)
    budget = ints.get("max_num_batched_tokens", 8192)
    if budget < seqs:
        raise SimConfigError(join(name, "max_num_batched_tokens"),
                             f"must be >= max_num_seqs ({seqs}), got {budget}")
    util = number(join(name, "gpu_memory_utilization"), data.get("gpu_memory_utilization", 0.9),
                  positive=True, maximum=1.0)
    policy = data.get("policy", "fcfs")
    if policy not in ("fcfs", "priority", "fair"):
        raise SimConfigError(join(name, "policy"),
                             f"must be 'fcfs', 'priority' or 'fair', got {policy!r}")
    caching = data.get("enable_prefix_caching", True)
    if not isinstance(caching, bool):
        raise SimConfigError(join(name, "enable_prefix_caching"), "must be true or false")
    return ReplicaConfig(gpu_memory_utilization=util, policy=policy,
                         enable_prefix_caching=caching, **ints)


def gateway_config(spec: object, name: str = "gateways") -> GatewayConfig:
    """A :class:`GatewayConfig` from its table."""
    data = table(name, spec)
    known_keys(name, data, {"count", "routing", "load_factor", "cache_index"})
    routing = data.get("routing", "consistent_hash")
    if not isinstance(routing, str):
        raise SimConfigError(join(name, "routing"), f"must be a policy name, got {routing!r}")
    index = data.get("cache_index", False)
    if not isinstance(index, bool):
        raise SimConfigError(join(name, "cache_index"), "must be true or false")
    config = GatewayConfig(integer(join(name, "count"), data.get("count", 1), minimum=1),
                           routing, number(join(name, "load_factor"),
                                           data.get("load_factor", 1.25), minimum=1.0), index)
    from servekit.sim.fleet import make_policy

    try:
        make_policy(config, 0)
    except Exception as exc:  # unknown name, bad plugin arguments: the plugin resolver says why
        raise SimConfigError(join(name, "routing"), str(exc)) from exc
    return config


def slo_from(spec: object, name: str = "slo") -> SLO:
    """An :class:`SLO` from its table (missing objectives are unbounded)."""
    data = table(name, spec)
    known_keys(name, data, {"ttft", "itl"})
    return SLO(*(number(join(name, k), data[k], positive=True) if k in data else math.inf
                 for k in ("ttft", "itl")))
