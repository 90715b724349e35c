"""Autoscaling the engine replicas on servekit's load numbers: the default policy's arithmetic
(no cluster), its settings, and a burst that scales fake replicas from 1 to 2 and back on a
local Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.server.config import ConfigError
from tests._servers import require_module
from tests.deploy._apps import deployed

require_module("ray", "pip install 'servekit[ray]'")

from servekit.deploy.ray import (  # noqa: E402
    ServekitAutoscalingPolicy,
    autoscaling_config,
    desired_replicas,
    load_settings,
)


def ctx(metrics: dict[str, dict[str, float]], ongoing: float = 0.0, target: int = 1) -> Any:
    return SimpleNamespace(aggregated_metrics=metrics, total_num_requests=ongoing,
                           target_num_replicas=target)


def test_requests_running_and_waiting_over_the_target_set_the_replicas() -> None:
    policy = ServekitAutoscalingPolicy(target_requests=8)
    load = {"running": {"r1": 8.0, "r2": 8.0}, "waiting": {"r1": 6.0, "r2": 2.0},
            "kv_usage": {"r1": 0.3, "r2": 0.3}}
    wanted, _ = policy(ctx(load, ongoing=24))
    assert math.ceil(wanted) == 3  # 24 requests, 8 each
    idle = {"running": {"r1": 0.0, "r2": 1.0}, "waiting": {"r1": 0.0, "r2": 0.0},
            "kv_usage": {"r1": 0.0, "r2": 0.05}}
    assert math.ceil(policy(ctx(idle, ongoing=1))[0]) == 1


def test_kv_usage_scales_before_the_caches_fill() -> None:
    policy = ServekitAutoscalingPolicy(target_requests=64, target_kv_usage=0.8)
    long_prompts = {"running": {"r1": 4.0, "r2": 4.0}, "waiting": {"r1": 0.0, "r2": 0.0},
                    "kv_usage": {"r1": 0.95, "r2": 0.9}}
    assert math.ceil(policy(ctx(long_prompts, ongoing=8))[0]) == 3  # 1.85 / 0.8


def test_requests_ray_holds_count_too_and_no_report_holds_steady() -> None:
    policy = ServekitAutoscalingPolicy(target_requests=4)
    assert math.ceil(policy(ctx({}, ongoing=10))[0]) == 3  # queued at handles, not reported
    assert policy(ctx({}, ongoing=0, target=2))[0] == 2


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500), st.floats(0, 1)),
                min_size=1, max_size=16),
       st.floats(0.5, 256), st.floats(0.05, 1))
def test_the_wanted_replicas_cover_the_load(loads: list[tuple[int, int, float]],
                                            target: float, kv_target: float) -> None:
    running, waiting, kv = (sum(x[i] for x in loads) for i in range(3))
    wanted = desired_replicas(running, waiting, kv, 0, target_requests=target,
                              target_kv_usage=kv_target)
    n = math.ceil(wanted)
    assert n * target >= running + waiting - 1e-6 and n * kv_target >= kv - 1e-9
    # and not more than needed: one replica fewer would be over a target
    if n >= 1:
        assert ((n - 1) * target < running + waiting + 1e-9) or ((n - 1) * kv_target < kv + 1e-9)


def test_settings_build_rays_autoscaling_config(tmp_path: Path) -> None:
    path = tmp_path / "servekit.toml"
    path.write_text("[engine]\nfake = true\nmax_num_seqs = 32\n"
                    "[ray]\nreplicas = 2\nmax_replicas = 6\nautoscaling_interval = 2\n")
    config = autoscaling_config(load_settings(path))
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (2, 2, 6)
    assert config.look_back_period_s == 6 and config.metrics_interval_s == 2
    assert config.policy.policy_kwargs == {"target_requests": 32.0, "target_kv_usage": 0.8}
    assert config.policy.get_policy() is ServekitAutoscalingPolicy


@pytest.mark.parametrize(("toml", "message"), [
    ("replicas = 3\nmax_replicas = 2\n", "ray.max_replicas: autoscaling needs"),
    ("min_replicas = 1\n", "ray.min_replicas: autoscaling needs ray.max_replicas"),
    ("max_replicas = 2\ntarget_kv_usage = 1.5\n", "ray.target_kv_usage: must be in"),
    ("max_replicas = 2\ntarget_requests = 0\n", "ray.target_requests: must be > 0"),
    ("max_replicas = 2\ndownscale_delay = -1\n", "ray.downscale_delay: must be >= 0"),
])
def test_bad_autoscaling_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "servekit.toml"
    path.write_text("[engine]\nfake = true\n[ray]\n" + toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


# --- on a local Ray --------------------------------------------------------------------------

APP = "servekit-autoscale"
CONFIG = """
[engine]
fake = true
fake_token_delay = 0.01

[ray]
replicas = 1
max_replicas = 2
target_requests = 4
upscale_delay = 0
downscale_delay = 2
autoscaling_interval = 0.5
replica_cpus = 0.25
ingress_cpus = 0.25
"""


@pytest.fixture(scope="module")
def app(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with deployed(ray_serve, tmp_path_factory.mktemp("autoscale"), CONFIG, APP) as url:
        yield url


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications[APP]
    return int(app.deployments["EngineReplica"].replica_states.get("RUNNING", 0))


def reported_metrics() -> set[str]:
    """The metric names Ray's controller holds for the engine replicas (its testing hook)."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    return set(ray.get(controller._get_metrics_for_deployment_for_testing.remote(
        DeploymentID("EngineReplica", APP))))


def wait_until(check: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return False


@pytest.mark.slow
def test_a_burst_scales_from_one_replica_to_two_and_back(app: str) -> None:
    assert running_replicas() == 1
    body = {"model": "fake", "prompt": "burst", "max_tokens": 200, "stream": True}  # ~2 s
    stop = False

    def stream() -> None:
        with httpx.Client(base_url=app, timeout=60) as http:
            while not stop:
                with http.stream("POST", "/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    for _ in resp.iter_bytes():
                        pass

    with ThreadPoolExecutor(12) as pool:  # 12 requests in flight, target 4 per replica
        futures = [pool.submit(stream) for _ in range(12)]
        try:
            assert wait_until(lambda: running_replicas() == 2, 90), "did not scale up"
            # the policy got servekit's own load numbers, not only Ray's request counts
            assert {"running", "waiting", "kv_usage"} <= reported_metrics()
        finally:
            stop = True
        for f in futures:
            f.result()
    assert wait_until(lambda: running_replicas() == 1, 60), "did not scale back down"
