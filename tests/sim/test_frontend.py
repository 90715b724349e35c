"""The front end's cost: fitted from a step log, charged serially against each replica's time
(TTFT grows with load, capacity saturates at the closed-form rate), bad values rejected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.sim import (
    FrontendCost,
    ProfiledModel,
    ReplicaConfig,
    Scenario,
    SimConfigError,
    Simulator,
    arrival_trace,
    simulate,
    workload_from_dict,
)
from servekit.sim.profile import profile_step_log, speed_factors, step_log_cycles
from servekit.sim.steptime import StepShape
from servekit.sim.workload import Arrival

from .conftest import small_scenario


def _write_log(path: Path, truth: ProfiledModel, cost: FrontendCost, seed: int,
               n: int = 300, slower_from: int | None = None,
               slower: tuple[float, float] = (1.0, 1.0)) -> None:
    """A step log of a busy server whose cycles take exactly profile + front-end cost, with an
    idle gap now and then (those cycles must not be fitted); from step ``slower_from`` on, the
    steps and the front end's work take ``slower`` times as long."""
    import numpy as np

    rng = np.random.default_rng(seed)
    now, prev_tokens = 0.0, 0
    with path.open("w") as file:
        for i in range(n):
            decodes = int(rng.integers(0, 16))
            prefill = int(rng.integers(1, 256)) if i % 3 == 0 or not decodes else 0
            ctx = int(rng.integers(1, 200))
            shape = StepShape(prefill, decodes, decodes * ctx + prefill,
                              float(decodes * ctx + prefill * (prefill + 1) / 2))
            arrivals = int(rng.integers(0, 5))
            idle = i % 25 == 24  # nothing left after this step: the next one waits for a request
            step_speed, fe_speed = (slower if slower_from is not None and i >= slower_from
                                    else (1.0, 1.0))
            step = truth.step_time(shape) * step_speed
            now += step + (cost.per_request * arrivals + cost.per_token * prev_tokens) * fe_speed
            tokens = decodes + (1 if prefill else 0) + int(rng.integers(0, 3))
            file.write(json.dumps({
                "batch_size": 1, "scheduled_tokens": shape.tokens,
                "num_running": 0 if idle else 3, "num_waiting": 0, "duration": step,
                "time": now, "prefill_tokens": prefill, "num_decodes": decodes,
                "kv_tokens": shape.kv_tokens, "attention_pairs": shape.attention_pairs,
                "arrivals": arrivals, "output_tokens": tokens}) + "\n")
            if idle:
                now += float(rng.uniform(0.5, 3.0))  # waiting, not working
            prev_tokens = tokens


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(per_request=st.floats(0.0, 5e-3), per_token=st.floats(0.0, 1e-3),
       seed=st.integers(0, 2**16))
def test_the_fit_recovers_a_known_front_end_cost_from_a_step_log(
        tmp_path_factory: pytest.TempPathFactory, per_request: float, per_token: float,
        seed: int) -> None:
    truth = ProfiledModel([2e-3, 4e-5, 3e-4, 1e-6, 2e-9])
    cost = FrontendCost(per_request, per_token)
    log = tmp_path_factory.mktemp("fe") / "steps.jsonl"
    _write_log(log, truth, cost, seed)
    cycles = step_log_cycles(log)
    # every cycle but the first step's and the 11 after an idle step (the last step idles too)
    assert cycles is not None and len(cycles.seconds) == 300 - 1 - 11
    fitted = profile_step_log(log)
    assert fitted.frontend is not None
    assert fitted.frontend.per_request == pytest.approx(per_request, abs=1e-9)
    assert fitted.frontend.per_token == pytest.approx(per_token, abs=1e-9)
    for got, want in zip(fitted.coefficients, truth.coefficients, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    # the profile file carries the cost, and a scenario with that profile uses it
    path = log.parent / "profile.json"
    fitted.save(path)
    assert ProfiledModel.load(path).frontend == fitted.frontend


@pytest.mark.parametrize("slower", [(1.08, 1.08), (1.0, 1.3), (0.9, 1.15)])
def test_a_slower_stretch_of_a_step_log_is_measured_and_the_profile_scaled_to_it(
        tmp_path: Path, slower: tuple[float, float]) -> None:
    truth = ProfiledModel([2e-3, 4e-5, 3e-4, 1e-6, 2e-9], frontend=FrontendCost(1e-3, 1e-4))
    log = tmp_path / "steps.jsonl"
    _write_log(log, truth, FrontendCost(1e-3, 1e-4), 3, n=400, slower_from=200, slower=slower)
    times = [json.loads(line)["time"] for line in log.read_text().splitlines()]
    whole = step_log_cycles(log)
    assert whole is not None and whole.ends == sorted(whole.ends)
    before, after = whole.window(times[0], times[199]), whole.window(times[200], times[-1])
    assert len(before.seconds) + len(after.seconds) == len(whole.seconds)
    assert all(times[200] <= at for at in after.ends) and before.ends[-1] <= times[199]
    steps, frontend = before.predicted(truth)  # the log's cycles take exactly the truth's
    assert list(steps + frontend) == pytest.approx(before.seconds)
    assert speed_factors(truth, before) == pytest.approx((1.0, 1.0))
    assert speed_factors(truth, after) == pytest.approx(slower)
    # the profile at those speeds predicts the slower cycles: steps and front end apart
    slow = truth.scaled(*slower)
    assert speed_factors(slow, after) == pytest.approx((1.0, 1.0))
    assert slow.frontend is not None
    assert slow.frontend.per_request == pytest.approx(1e-3 * slower[1])
    assert slow.frontend.per_token == pytest.approx(1e-4 * slower[1])
    shape = StepShape(64, 3, 100, 2000.0)
    assert slow.step_time(shape) == pytest.approx(slower[0] * truth.step_time(shape))


def test_speed_factors_of_no_cycles_or_a_bad_factor_are_errors(tmp_path: Path) -> None:
    truth = ProfiledModel([2e-3, 4e-5, 3e-4, 1e-6, 2e-9], frontend=FrontendCost(1e-3, 1e-4))
    log = tmp_path / "steps.jsonl"
    _write_log(log, truth, FrontendCost(1e-3, 1e-4), 3, n=50)
    last = json.loads(log.read_text().splitlines()[-1])["time"]
    cycles = step_log_cycles(log)
    assert cycles is not None
    nothing = cycles.window(last + 1, last + 2)
    assert not nothing.seconds
    with pytest.raises(SimConfigError, match="cycles"):
        speed_factors(truth, nothing)
    with pytest.raises(SimConfigError, match="factor"):
        truth.scaled(0.0)
    # no front-end cost to compare: the steps' factor stands for both
    bare = ProfiledModel(truth.coefficients)
    step, front = speed_factors(bare, cycles)
    assert step == front and step > 1.0  # the cycles' front-end work lands on the steps


def test_a_step_log_without_the_front_end_fields_fits_the_steps_alone(tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    _write_log(log, ProfiledModel([2e-3, 4e-5, 3e-4, 0, 0]), FrontendCost(1e-3, 1e-4), 0)
    old = [{k: v for k, v in json.loads(line).items() if k not in ("arrivals", "output_tokens")}
           for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert step_log_cycles(log) is None
    fitted = profile_step_log(log)
    assert fitted.frontend is None
    assert fitted.coefficients[:3] == pytest.approx((2e-3, 4e-5, 3e-4), rel=1e-6)


def _one_replica(rate: float, frontend: FrontendCost | None, *, profile: ProfiledModel,
                 prompt: int = 64, output: int = 16, seqs: int = 16,
                 duration: float = 60.0) -> Scenario:
    wl = workload_from_dict({"rate": rate, "prompt": prompt, "output": output})
    rc = ReplicaConfig(count=1, max_num_seqs=seqs, max_num_batched_tokens=256, num_blocks=4096)
    return Scenario(wl, profile, 4096, 1024, rc, duration=duration, seed=3, vocab_size=1000,
                    frontend=frontend)


STEPS = ProfiledModel([1e-3, 2e-5, 2e-4, 0, 0])


def test_the_front_ends_cost_raises_ttft_more_under_load() -> None:
    cost = FrontendCost(per_request=1.5e-3, per_token=2e-4)
    light, heavy = 5.0, 120.0
    ttft = {(rate, fe is not None): simulate(_one_replica(rate, fe, profile=STEPS)).all.ttft.p50
            for rate in (light, heavy) for fe in (None, cost)}
    added_light = ttft[light, True] - ttft[light, False]
    added_heavy = ttft[heavy, True] - ttft[heavy, False]
    # alone, a request pays its own admission and its token's write
    assert added_light >= cost.per_request + cost.per_token - 1e-9
    # under load it also waits for the others' admissions and streamed tokens
    assert added_heavy > 2 * added_light


C1, C2, PROMPT, OUTPUT = 2e-5, 4e-4, 64, 16
#: no per-step constant: the engine's time is additive per request, P·c1 + (n - 1)·c2 (the
#: first token comes from the prefill step), whatever the batch
ADDITIVE = ProfiledModel([0.0, C1, C2, 0.0, 0.0])
ENGINE = PROMPT * C1 + (OUTPUT - 1) * C2

COSTS = [(2e-3, 0.0, 1), (0.0, 3e-4, 1), (2e-3, 3e-4, 1), (2e-3, 3e-4, 64), (0.0, 0.0, 64)]


@pytest.mark.parametrize(("per_request", "per_token", "seqs"), COSTS)
def test_a_backlog_is_served_at_the_closed_form_rate(per_request: float, per_token: float,
                                                     seqs: int) -> None:
    # the replica's thread admits, computes and streams one request in c + n·t + engine
    # seconds and never idles on a backlog: N requests take exactly N times that
    n = 200
    sc = _one_replica(1.0, FrontendCost(per_request, per_token), profile=ADDITIVE,
                      prompt=PROMPT, output=OUTPUT, seqs=seqs)
    result = simulate(sc, arrivals=[Arrival(0.0, 0)] * n)
    assert [r.outcome for r in result.records] == ["finished"] * n
    makespan = max(r.end for r in result.records)
    assert makespan == pytest.approx(n * (per_request + OUTPUT * per_token + ENGINE), rel=1e-9)


@pytest.mark.parametrize(("per_request", "per_token", "seqs"), COSTS)
def test_sustained_load_saturates_at_the_closed_form_rate(per_request: float, per_token: float,
                                                          seqs: int) -> None:
    capacity = 1.0 / (per_request + OUTPUT * per_token + ENGINE)
    for load in (0.8, 1.5):
        rate = load * capacity
        result = simulate(_one_replica(rate, FrontendCost(per_request, per_token),
                                       profile=ADDITIVE, prompt=PROMPT, output=OUTPUT,
                                       seqs=seqs, duration=40.0))
        # below capacity it keeps up; past it, admitting every arrival (rate · c of each
        # second) leaves 1 - rate·c of the thread to compute and stream
        served = rate if load < 1 else (1 - rate * per_request) / (OUTPUT * per_token + ENGINE)
        assert result.throughput["requests_per_s"] == pytest.approx(served, rel=0.04)
    assert served <= capacity * (1 + 1e-9)


def test_a_zero_front_end_cost_schedules_exactly_as_none() -> None:
    def summary(fe: FrontendCost | None) -> list[tuple[Any, ...]]:
        sim = Simulator(small_scenario(duration=30.0, workload={"rate": 6.0},
                                       frontend={"per_request": 0.0, "per_token": 0.0})
                        if fe is not None else small_scenario(duration=30.0,
                                                              workload={"rate": 6.0}))
        sim.run()
        return [(r.id, r.arrival, r.first, r.end, r.n_out, r.outcome, r.replica)
                for r in sim.records]

    assert summary(FrontendCost()) == summary(None)


def test_a_scenario_takes_the_profiles_front_end_unless_it_gives_its_own(
        tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    ProfiledModel([1e-3, 1e-5, 1e-4, 0, 0], frontend=FrontendCost(1e-3, 1e-4)).save(path)
    base: dict[str, Any] = {"profile": str(path), "replicas": {"num_blocks": 100,
                                                                "max_model_len": 512}}
    assert small_scenario(**base).frontend == FrontendCost(1e-3, 1e-4)
    own = small_scenario(**base, frontend={"per_request": 5e-3})
    assert own.frontend == FrontendCost(5e-3, 0.0)


@pytest.mark.parametrize(("spec", "field"), [
    ({"per_request": -1e-3}, "frontend.per_request"),
    ({"per_token": -1e-6}, "frontend.per_token"),
    ({"per_token": float("inf")}, "frontend.per_token"),
    ({"per_token": "fast"}, "frontend.per_token"),
    ({"per_call": 1e-3}, "frontend.per_call"),
])
def test_bad_front_end_costs_are_rejected_naming_the_field(spec: dict[str, Any],
                                                           field: str) -> None:
    with pytest.raises(SimConfigError) as exc:
        small_scenario(frontend=spec)
    assert exc.value.field == field and field in str(exc.value)


def test_a_negative_cost_is_rejected_in_code_and_in_a_profile(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match=r"frontend\.per_request: must be >= 0"):
        FrontendCost(per_request=-0.001)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"kind": "profiled", "coefficients": [1e-3, 0, 0, 0, 0],
                                "frontend": {"per_request": 0.0, "per_token": -1.0}}))
    with pytest.raises(SimConfigError) as exc:
        ProfiledModel.load(path)
    assert exc.value.field == "profile.frontend.per_token"


def test_a_given_arrival_trace_is_replayed() -> None:
    sc = small_scenario(duration=20.0)
    trace = arrival_trace(sc)
    assert trace and all(a.time < 20.0 for a in trace)
    assert [r.arrival for r in simulate(sc, arrivals=trace).records] == [a.time for a in trace]
    # the scenario's own draw is that trace
    assert [r.arrival for r in simulate(sc).records] == [a.time for a in trace]
    other = [Arrival(t, 0) for t in (0.5, 1.25, 7.0)]
    assert [r.arrival for r in simulate(sc, arrivals=other).records] == [0.5, 1.25, 7.0]


def test_sim_profile_writes_the_fitted_front_end_into_the_profile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from servekit.server.cli import main

    log, out = tmp_path / "steps.jsonl", tmp_path / "profile.json"
    _write_log(log, ProfiledModel([2e-3, 4e-5, 3e-4, 0, 0]), FrontendCost(1.5e-3, 2e-4), 5)
    assert main(["sim", "profile", "--step-log", str(log), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1.500 ms per request, 0.200 ms per streamed token" in printed
    data = json.loads(out.read_text())
    assert data["frontend"] == pytest.approx({"per_request": 1.5e-3, "per_token": 2e-4})
    assert data["meta"]["source"] == "step_log" and data["meta"]["r2"] > 0.999999


def test_a_log_that_cannot_tell_the_token_cost_from_the_step_gives_it_to_the_step() -> None:
    from servekit.sim.steptime import fit_with_frontend

    # one token streamed per cycle, always: per_token is indistinguishable from the constant
    shapes = [StepShape(0, 1, 10 + i % 7, 10.0 + i % 7) for i in range(50)]
    arrivals = [i % 3 for i in range(50)]
    seconds = [2e-3 + 1e-3 * a + 5e-4 for a in arrivals]
    fitted = fit_with_frontend(shapes, arrivals, [1] * 50, seconds)
    assert fitted.frontend is not None
    assert fitted.frontend.per_request == pytest.approx(1e-3)
    assert fitted.frontend.per_token == 0.0
    assert fitted.step_time(shapes[0]) == pytest.approx(2.5e-3)


@pytest.mark.parametrize(("arrives", "first"), [(11e-3, 20e-3), (13e-3, 24e-3)])
def test_a_request_not_admitted_when_the_step_in_flight_ends_misses_the_next_step(
        arrives: float, first: float) -> None:
    # 4 ms steps, 2 ms to admit a request. A arrives at 0: admitted at 2, steps run 2-6,
    # 6-10, 10-14; at 14 the replica's thread pays B's admission (2 ms) before stepping again.
    # B at 11 ms was admitted by 13, before the step ended: it joins the step at 16-20. B at
    # 13 ms is still being admitted at 14 (the server's front end parses it beside the step,
    # and the engine schedules the next step with what is queued when a step ends): it waits
    # for the step 16-20 to end and is prefilled at 20-24.
    sc = _one_replica(1.0, FrontendCost(2e-3, 0.0), profile=ProfiledModel([4e-3, 0, 0, 0, 0]),
                      prompt=8, output=16)
    records = simulate(sc, arrivals=[Arrival(0.0, 0), Arrival(arrives, 0)]).records
    assert records[0].first == pytest.approx(6e-3)
    assert records[1].first == pytest.approx(first)
