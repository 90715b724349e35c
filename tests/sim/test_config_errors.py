"""Bad specs, negative rates and impossible SLOs are clear errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servekit.sim import (
    SimConfigError,
    device_spec,
    model_spec,
    scenario_from_dict,
    workload_from_dict,
)
from servekit.sim.errors import InfeasibleError
from servekit.sim.planner import plan_capacity
from servekit.sim.steptime import ProfiledModel

from .conftest import small_scenario


def _field(exc: pytest.ExceptionInfo[SimConfigError]) -> str:
    return exc.value.field


@pytest.mark.parametrize(("overrides", "field"), [
    ({"workload": {"rate": -1.0}}, "workload.rate"),
    ({"workload": {"rate": float("nan")}}, "workload.rate"),
    ({"workload": {"prompt": {"dist": "lognormal", "median": -3}}}, "workload.prompt.median"),
    ({"workload": {"prompt": {"dist": "zipf"}}}, "workload.prompt.dist"),
    ({"workload": {"output": {"dist": "uniform", "low": 10, "high": 5}}}, "workload.output.high"),
    ({"workload": {"arrival": "hawkes"}}, "workload.arrival"),
    ({"workload": {"cv": 0}}, "workload.cv"),
    ({"workload": {"preset": "chatty"}}, "workload.preset"),
    ({"workload": {"tenants": [{"name": "a", "rpm": -5}]}}, "workload.tenants[0].rpm"),
    ({"workload": {"tenants": [{"name": "a"}, {"name": "a"}]}}, "workload.tenants"),
    ({"workload": {"cancel": {"probability": 1.5}}}, "workload.cancel.probability"),
    ({"workload": {"diurnal": {"curve": [[10, 1.0], [5, 2.0]]}}}, "workload.diurnal.curve"),
    ({"workload": {"typo": 1}}, "workload.typo"),
    ({"replicas": {"count": 0}}, "replicas.count"),
    ({"replicas": {"max_num_seqs": 64, "max_num_batched_tokens": 32}},
     "replicas.max_num_batched_tokens"),
    ({"replicas": {"policy": "lifo"}}, "replicas.policy"),
    ({"gateways": {"routing": "random"}}, "gateways.routing"),
    ({"slo": {"ttft": 0}}, "slo.ttft"),
    ({"duration": -10}, "duration"),
    ({"warmup": 100}, "warmup"),
    ({"device": "tpu-v9"}, "device"),
    ({"device": {"name": "x", "peak_flops": 1e12}}, "device.mem_bandwidth"),
    ({"device": {"name": "x", "peak_flops": 1e12, "mem_bandwidth": 1e12, "memory": 8e9,
                 "link_bandwidth": 1e9, "compute_efficiency": 2.0}}, "device.compute_efficiency"),
    ({"model": "gpt-9"}, "model"),
    ({"model": {"name": "m", "params": 1e9, "layers": 2}}, "model.hidden_size"),
    ({"tp": 3}, "tp"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_scenarios_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SimConfigError) as exc:
        small_scenario(**overrides)
    assert _field(exc) == field
    assert field in str(exc.value)


def test_a_model_that_does_not_fit_the_device_names_tp() -> None:
    data = {"model": "llama-3-70b", "device": "l40s", "workload": {"rate": 1.0, "prompt": 10,
                                                                   "output": 10}}
    with pytest.raises(SimConfigError) as exc:
        scenario_from_dict(data)
    assert exc.value.field == "tp"
    assert "does not fit" in str(exc.value)
    scenario_from_dict({**data, "tp": 4})  # four of them hold it


def test_profiled_without_sizes_needs_num_blocks(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    ProfiledModel([0.01, 1e-4, 1e-3, 0, 0]).save(path)
    data = {"profile": str(path), "workload": {"rate": 1.0, "prompt": 10, "output": 10}}
    with pytest.raises(SimConfigError) as exc:
        scenario_from_dict(data)
    assert exc.value.field == "replicas.num_blocks"
    with pytest.raises(SimConfigError) as exc:
        scenario_from_dict({**data, "replicas": {"num_blocks": 100}})
    assert exc.value.field == "replicas.max_model_len"
    sc = scenario_from_dict({**data, "replicas": {"num_blocks": 100, "max_model_len": 512}})
    assert sc.num_blocks == 100


def test_bad_profile_files(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="does not exist"):
        ProfiledModel.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"kind": "roofline"}')
    with pytest.raises(SimConfigError, match="not a servekit step-time profile"):
        ProfiledModel.load(tmp_path / "x.json")
    with pytest.raises(SimConfigError) as exc:
        ProfiledModel([0.01, -1.0, 0, 0, 0])
    assert exc.value.field == "profile.coefficients[1]"


def test_trace_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("prompt_tokens,output_tokens\n10,x\n")
    with pytest.raises(SimConfigError) as exc:
        workload_from_dict({"rate": 1.0, "trace": str(bad)})
    assert exc.value.field == "workload.trace"
    assert "line 2" in str(exc.value)


def test_an_impossible_slo_is_infeasible() -> None:
    wl = workload_from_dict({"preset": "chat", "rate": 1.0})
    with pytest.raises(InfeasibleError, match="impossible"):
        plan_capacity(model_spec("llama-3-8b"), device_spec("h100"), wl,
                      tokens_per_minute=1e6, ttft_p99=1e-4, itl_p99=1e-4, tp_options=(1,),
                      max_num_seqs_options=(64,), token_budget_options=(512,),
                      slice_replicas=1, duration=10, warmup=2)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tokens_per_minute": -1e9}, "tokens_per_minute"),
    ({"ttft_p99": 0.0}, "ttft_p99"),
    ({"itl_p99": float("inf")}, "itl_p99"),
    ({"slice_replicas": 0}, "slice_replicas"),
    ({"tp_options": ()}, "tp"),
])
def test_planner_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"tokens_per_minute": 1e6, "ttft_p99": 1.0, "itl_p99": 0.05}
    args.update(kwargs)
    wl = workload_from_dict({"preset": "chat", "rate": 1.0})
    with pytest.raises(SimConfigError) as exc:
        plan_capacity(model_spec("llama-3-8b"), device_spec("h100"), wl, **args)
    assert exc.value.field == field
