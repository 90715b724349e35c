"""Small scenarios built in code (no files), for the simulator's tests."""

from __future__ import annotations

import math
from typing import Any

from servekit.sim import Scenario, scenario_from_dict

#: a slow made-up device, so that simulated hours take few steps
SLOW_DEVICE: dict[str, Any] = {
    "name": "slow", "peak_flops": 50e12, "mem_bandwidth": 0.5e12, "memory": 80e9,
    "link_bandwidth": 50e9, "step_overhead": 0.04,
}


def small_scenario(**overrides: Any) -> Scenario:
    """Llama-3-8B on the slow device, two tenants, a chat-like workload; ``overrides`` are
    merged into the TOML-shaped table (``workload`` and ``replicas`` merge one level deep)."""
    data: dict[str, Any] = {
        "duration": 60.0, "seed": 7, "model": "llama-3-8b", "device": dict(SLOW_DEVICE),
        "replicas": {"count": 2, "max_num_seqs": 32, "max_num_batched_tokens": 512,
                     "num_blocks": 400},
        "slo": {"ttft": 2.0, "itl": 0.5},
        "workload": {"rate": 2.0, "prompt": {"dist": "uniform", "low": 16, "high": 200},
                     "output": {"dist": "uniform", "low": 4, "high": 60},
                     "system_prompts": {"count": 2, "tokens": 64}},
    }
    for key, value in overrides.items():
        if key in ("workload", "replicas") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return scenario_from_dict(data)


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
