"""Workload strategies and the fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.testing import FakeClock, RequestSpec, to_request
from servekit.testing.strategies import (
    ARRIVAL_PATTERNS,
    SHARED_PREFIXES,
    arrival_times,
    request_specs,
    workloads,
)


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(0, 20), pattern=st.sampled_from(ARRIVAL_PATTERNS))
def test_arrival_patterns_are_sorted_and_sized(data: st.DataObject, n: int, pattern: str) -> None:
    times = data.draw(arrival_times(n, pattern, mean_gap=0.5))
    assert len(times) == n and times == sorted(times) and all(t >= 0 for t in times)
    if pattern == "burst":
        assert set(times) <= {0.0}
    if pattern == "uniform":
        assert times == [i * 0.5 for i in range(n)]


def test_unknown_pattern_is_named() -> None:
    with pytest.raises(ValueError, match="pattern must be one of"):
        arrival_times(3, "zigzag")


@settings(max_examples=40)
@given(workload=workloads(max_requests=12, tenants=("x", "y")))
def test_workloads_are_sorted_valid_requests(workload: list[RequestSpec]) -> None:
    assert 1 <= len(workload) <= 12
    assert [s.arrival for s in workload] == sorted(s.arrival for s in workload)
    for i, spec in enumerate(workload):
        assert spec.tenant in ("x", "y") and 0 <= spec.priority <= 2
        assert any(spec.prompt[: len(p)] == p for p in SHARED_PREFIXES)
        assert 0 not in spec.prompt  # the fake model's eos
        req = to_request(spec, f"r{i}")
        assert req.prompt_token_ids == list(spec.prompt)
        assert req.params.max_tokens == spec.max_tokens
        assert spec.min_tokens <= spec.max_tokens


@settings(max_examples=30)
@given(spec=request_specs(abort_probability=0.0))
def test_no_aborts_when_probability_is_zero(spec: RequestSpec) -> None:
    assert spec.abort_after is None


def test_fake_clock() -> None:
    clock = FakeClock(2.0)
    assert clock() == 2.0 and clock.advance(0.5) == 2.5 and clock() == 2.5
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        clock.advance(-1)
