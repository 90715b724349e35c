"""Step-time models: the roofline's regimes, tensor parallelism, MoE; the profile fit."""

from __future__ import annotations

import numpy as np
import pytest

from servekit.sim import (
    ProfiledModel,
    RooflineModel,
    StepShape,
    device_spec,
    fit_profile,
    model_spec,
)
from servekit.sim.specs import device_names, model_names

H100, L8B = device_spec("h100"), model_spec("llama-3-8b")


def decode(n: int, ctx: int) -> StepShape:
    return StepShape(0, n, n * (ctx + 1), float(n * (ctx + 1)))


def prefill(tokens: int) -> StepShape:
    return StepShape(tokens, 0, tokens, tokens * (tokens + 1) / 2)


def test_builtin_specs_load() -> None:
    assert {"h100", "h200", "a100", "l40s"} <= set(device_names())
    assert {"llama-3-8b", "llama-3-70b", "qwen3-8b", "qwen3-32b", "mixtral-8x7b"} <= set(
        model_names())
    for name in model_names():
        m = model_spec(name)
        assert m.active_params <= m.params
        assert m.kv_bytes_per_token == 2 * m.layers * m.num_kv_heads * m.head_dim * m.dtype_bytes


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    rm = RooflineModel(L8B, H100)
    one = rm.step_time(decode(1, 512))
    weights_time = L8B.weight_bytes / (H100.mem_bandwidth * H100.bandwidth_efficiency)
    assert one == pytest.approx(weights_time + H100.step_overhead, rel=0.02)
    # 32 decodes cost little more than one: the weights are read once per step
    assert rm.step_time(decode(32, 512)) < 1.2 * one
    # a long prefill is compute-bound: time grows linearly with tokens
    t4k, t8k = rm.step_time(prefill(4096)), rm.step_time(prefill(8192))
    flops = 2 * L8B.active_params * 8192
    assert t8k > flops / (H100.peak_flops * H100.compute_efficiency)
    assert 1.9 < (t8k - H100.step_overhead) / (t4k - H100.step_overhead) < 2.3


def test_tensor_parallelism_and_faster_devices_cut_step_time() -> None:
    l70 = model_spec("llama-3-70b")
    tp2, tp4 = RooflineModel(l70, H100, tp=4), RooflineModel(l70, H100, tp=8)
    assert tp4.step_time(decode(16, 1024)) < tp2.step_time(decode(16, 1024))
    assert tp4.kv_capacity_tokens() > 2 * tp2.kv_capacity_tokens()
    h200 = RooflineModel(L8B, device_spec("h200"))
    assert h200.step_time(decode(8, 512)) < RooflineModel(L8B, H100).step_time(decode(8, 512))


def test_moe_reads_all_experts_but_computes_the_active_ones() -> None:
    mix = model_spec("mixtral-8x7b")
    dense = model_spec({**{k: getattr(mix, k) for k in (
        "layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
        "max_model_len")}, "name": "dense", "params": mix.params})
    moe_m, dense_m = RooflineModel(mix, H100, tp=2), RooflineModel(dense, H100, tp=2)
    assert moe_m.step_time(decode(1, 128)) == pytest.approx(dense_m.step_time(decode(1, 128)))
    assert moe_m.step_time(prefill(8192)) < 0.5 * dense_m.step_time(prefill(8192))


def test_fit_profile_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    truth = ProfiledModel([0.004, 3e-5, 2e-4, 1e-7, 0.0])
    shapes = [StepShape(int(p), int(d), int(k), float(a)) for p, d, k, a in zip(
        rng.integers(0, 512, 300), rng.integers(0, 64, 300), rng.integers(100, 20000, 300),
        rng.integers(100, 100000, 300), strict=True)]
    times = [truth.step_time(s) * (1 + rng.normal(0, 0.01)) for s in shapes]
    fitted = fit_profile(shapes, times)
    for got, want in zip(fitted.coefficients[:3], truth.coefficients[:3], strict=True):
        assert got == pytest.approx(want, rel=0.1)
    assert all(c >= 0 for c in fitted.coefficients)


def test_profile_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = ProfiledModel([0.01, 1e-4, 1e-3, 1e-6, 0.0], meta={"machine": "x"})
    model.save(tmp_path / "p.json")
    again = ProfiledModel.load(tmp_path / "p.json")
    assert again.coefficients == model.coefficients and again.meta == {"machine": "x"}
