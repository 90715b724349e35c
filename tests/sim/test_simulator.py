"""Whole simulations: determinism, accounting, tenants, limits, sessions, routing."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.sim import Simulator, simulate
from servekit.sim.results import OUTCOMES

from .conftest import small_scenario


def _summary(result: Any) -> tuple[Any, ...]:
    return (result.to_dict(), [(r.id, r.tenant, r.arrival, r.prompt_len, r.n_out, r.first,
                                r.end, r.outcome, r.replica) for r in result.records])


def test_a_simulated_hour_is_deterministic_for_a_seed() -> None:
    overrides: dict[str, Any] = {
        "duration": 3600.0, "warmup": 60.0, "sample_interval": 30.0,
        "workload": {"rate": 0.6, "diurnal": {"period": 1800.0, "amplitude": 0.5},
                     "cancel": {"probability": 0.05, "after": 3.0},
                     "sessions": {"turns": {"dist": "uniform", "low": 1, "high": 3},
                                  "think_time": 5.0, "user_tokens": 40},
                     "tenants": [{"name": "a", "weight": 2.0},
                                 {"name": "b", "weight": 1.0, "rpm": 30}]},
    }
    first = simulate(small_scenario(**overrides))
    second = simulate(small_scenario(**overrides))
    assert _summary(first) == _summary(second)
    assert first.sim_time >= 3600.0
    assert len(first.records) > 1500  # an hour of traffic, not a stub
    assert first.all.outcomes["cancelled"] > 0
    other = simulate(small_scenario(**{**overrides, "seed": 8}))
    assert _summary(other) != _summary(first)


def test_sessions_come_back_to_their_replica_and_hit_the_cache() -> None:
    result = simulate(small_scenario(workload={
        "rate": 1.0, "sessions": {"turns": 4, "think_time": 1.0, "user_tokens": 20}}))
    turns = [r for r in result.records if r.turn > 0 and r.outcome == "finished"]
    assert turns
    assert result.router["prefix_hit_rate"] > 0.5  # later turns reuse the whole conversation
    assert sum(r.cached for r in turns) > 0.8 * sum(r.prompt_len for r in turns)


def test_a_flooding_tenant_is_limited_and_the_other_keeps_its_latency() -> None:
    base: dict[str, Any] = {"workload": {"tenants": [
        {"name": "steady", "rate": 1.0},
        {"name": "flood", "rate": 20.0, "start": 10.0, "end": 40.0, "rpm": 120}]}}
    result = simulate(small_scenario(**base))
    flood = result.tenants["flood"].outcomes
    assert flood["rejected_rate_limit"] > 0.5 * sum(flood.values())
    assert result.tenants["steady"].outcomes["rejected_rate_limit"] == 0
    unlimited = simulate(small_scenario(workload={"tenants": [
        {"name": "steady", "rate": 1.0}, {"name": "flood", "rate": 20.0, "start": 10.0,
                                          "end": 40.0}]}))
    assert (result.tenants["steady"].ttft.p90 < unlimited.tenants["steady"].ttft.p90)


def test_a_bounded_queue_rejects_when_full() -> None:
    result = simulate(small_scenario(
        replicas={"count": 1, "max_waiting_requests": 2, "max_num_seqs": 4},
        workload={"rate": 6.0}))
    assert result.all.outcomes["rejected_queue_full"] > 0
    assert result.all.outcomes["finished"] > 0


def test_routing_policies_balance() -> None:
    for routing in ("consistent_hash", "least_loaded", "power_of_two", "round_robin"):
        result = simulate(small_scenario(replicas={"count": 4}, gateways={"routing": routing},
                                         workload={"rate": 4.0}))
        assert result.router["max_over_mean"] < 1.5, routing
        assert sum(result.router["requests_per_replica"].values()) == len(
            [r for r in result.records if r.replica])


def _check_accounting(sim: Simulator) -> None:
    recs = sim.records
    assert all(r.outcome in OUTCOMES and r.outcome != "unfinished" for r in recs)
    for rep in sim.replicas.values():  # nothing leaked: blocks, requests
        assert not rep.sched.has_unfinished_requests()
        assert rep.kv.num_free_blocks == rep.kv.num_blocks
        assert not rep.busy and not rep.pending
    for router in sim.routers:
        assert all(v == 0 for v in router.loads.values())
    for limiter in sim.limiters.values():
        assert limiter.open_reservations == 0
    done = [r for r in recs if r.outcome == "finished"]
    assert all(r.n_out == r.max_tokens and r.first >= r.arrival and r.end >= r.first
               for r in done)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.floats(0.5, 12.0), replicas=st.integers(1, 3), gateways=st.integers(1, 2),
       cancel=st.floats(0.0, 0.6), rpm=st.one_of(st.none(), st.floats(30, 600)),
       queue=st.one_of(st.none(), st.integers(1, 8)), blocks=st.integers(40, 400),
       turns=st.integers(1, 3), seed=st.integers(0, 2**16),
       policy=st.sampled_from(["fcfs", "priority", "fair"]),
       arrival=st.sampled_from(["poisson", "gamma"]),
       frontend=st.one_of(st.none(), st.tuples(st.floats(0.0, 0.2), st.floats(0.0, 0.02))))
def test_every_arrived_request_is_accounted_for(
        rate: float, replicas: int, gateways: int, cancel: float, rpm: float | None,
        queue: int | None, blocks: int, turns: int, seed: int, policy: str,
        arrival: str, frontend: tuple[float, float] | None) -> None:
    tenants: list[dict[str, Any]] = [{"name": "a", "weight": 1.0, "priority": 1},
                                     {"name": "b", "weight": 2.0}]
    if rpm is not None:
        tenants[1]["rpm"] = rpm
    rc: dict[str, Any] = {"count": replicas, "num_blocks": blocks, "policy": policy}
    if queue is not None:
        rc["max_waiting_requests"] = queue
    sc = small_scenario(
        duration=20.0, seed=seed, replicas=rc, gateways={"count": gateways},
        workload={"rate": rate, "arrival": arrival, "cv": 2.0, "tenants": tenants,
                  "cancel": {"probability": cancel, "after": 0.5},
                  "sessions": {"turns": turns, "think_time": 0.5, "user_tokens": 30}},
        **({} if frontend is None else
           {"frontend": {"per_request": frontend[0], "per_token": frontend[1]}}))
    sim = Simulator(sc)
    result = sim.run()
    _check_accounting(sim)
    counts = result.all.outcomes
    in_window = [r for r in sim.records if r.arrival <= sc.duration]
    assert sum(counts.values()) == len(in_window)


def test_the_front_ends_latency_shifts_what_the_client_sees_and_nothing_else() -> None:
    base = small_scenario(duration=30.0)
    shifted = small_scenario(duration=30.0, frontend_latency=0.025)
    assert shifted.frontend_latency == 0.025
    a, b = Simulator(base), Simulator(shifted)
    a.run()
    b.run()
    assert len(a.records) == len(b.records)
    for x, y in zip(a.records, b.records, strict=True):  # the same schedule, seen later
        assert (x.outcome, x.n_out, x.replica) == (y.outcome, y.n_out, y.replica)
        if x.first >= 0:
            assert abs((y.ttft - x.ttft) - 0.025) < 1e-9
            assert abs(y.tpot - x.tpot) < 1e-9
        if x.outcome == "finished":
            assert abs((y.end - y.arrival) - (x.end - x.arrival) - 0.025) < 1e-9
