"""Hypothesis strategies for serving workloads: prompts with shared prefixes, output lengths,
tenants, priorities, arrival patterns and aborts.

A workload is a list of :class:`RequestSpec` sorted by arrival; :func:`to_request` turns a spec
into a scheduler :class:`~servekit.sched.Request`. Token ids avoid 0 (the fake model's eos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
from attrs import frozen
from hypothesis import strategies as st

from servekit.sched import Request, SamplingParams

#: Prompt prefixes shared between requests, so prefix caching has hits to find.
SHARED_PREFIXES: tuple[tuple[int, ...], ...] = (
    (), (5, 6, 7, 8), (5, 6, 7, 8, 9, 10, 11, 12), (3, 1, 4, 1, 5, 9, 2, 6, 5),
)
TENANTS: tuple[str, ...] = ("a", "b", "c")
ARRIVAL_PATTERNS: tuple[str, ...] = ("burst", "uniform", "poisson", "on_off")


@frozen(slots=True)
class RequestSpec:
    """One request of a workload: what it asks for, who asks, when it arrives, when it aborts.

    ``arrival`` and ``abort_after`` are in seconds (``abort_after`` relative to arrival; None:
    never aborted).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    priority: int = 0
    tenant: str | None = None
    arrival: float = 0.0
    abort_after: float | None = None

    @property
    def params(self) -> SamplingParams:
        """The request's sampling parameters."""
        return SamplingParams(max_tokens=self.max_tokens, min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids)


def to_request(spec: RequestSpec, request_id: str) -> Request:
    """The scheduler request for ``spec`` (arrival time is the scheduler clock's)."""
    return Request(request_id, list(spec.prompt), spec.params, priority=spec.priority,
                   tenant=spec.tenant)


def prompts(prefixes: Sequence[Sequence[int]] = SHARED_PREFIXES, *, vocab: int = 23,
            max_suffix: int = 8) -> st.SearchStrategy[tuple[int, ...]]:
    """A shared prefix (possibly empty) followed by 1 to ``max_suffix`` tokens in [1, vocab)."""
    return st.builds(
        lambda prefix, suffix: (*prefix, *suffix),
        st.sampled_from([tuple(p) for p in prefixes]),
        st.lists(st.integers(1, vocab - 1), min_size=1, max_size=max_suffix),
    )


def sampling(max_tokens: int = 12) -> st.SearchStrategy[dict[str, object]]:
    """Keyword arguments of :class:`RequestSpec` for output length and stopping."""
    return st.integers(1, max_tokens).flatmap(lambda n: st.fixed_dictionaries({
        "max_tokens": st.just(n),
        "min_tokens": st.integers(0, min(2, n)),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.sampled_from([(), (7,), (3, 11)]),
    }))


def request_specs(*, tenants: Sequence[str | None] = TENANTS, max_priority: int = 2,
                  max_tokens: int = 12, abort_probability: float = 0.2,
                  prefixes: Sequence[Sequence[int]] = SHARED_PREFIXES,
                  ) -> st.SearchStrategy[RequestSpec]:
    """One request at arrival 0 (see :func:`workloads` for arrivals)."""
    return st.builds(
        lambda prompt, params, priority, tenant, coin, delay: RequestSpec(
            prompt=prompt, priority=priority, tenant=tenant,
            abort_after=delay if coin < abort_probability else None,
            **params),  # type: ignore[arg-type]
        prompts(prefixes), sampling(max_tokens), st.integers(0, max_priority),
        st.sampled_from(list(tenants)), st.floats(0.0, 1.0, exclude_max=True),
        st.floats(0.0, 2.0),
    )


def arrival_times(n: int, pattern: str | None = None, *,
                  mean_gap: float = 0.1) -> st.SearchStrategy[list[float]]:
    """``n`` non-decreasing arrival times following ``pattern`` (any of
    :data:`ARRIVAL_PATTERNS` when None): everything at once, evenly spaced, exponential
    gaps, or bursts separated by idle periods."""
    if pattern is None:
        return st.sampled_from(ARRIVAL_PATTERNS).flatmap(
            lambda p: arrival_times(n, p, mean_gap=mean_gap))
    if pattern == "burst":
        return st.just([0.0] * n)
    if pattern == "uniform":
        return st.just([i * mean_gap for i in range(n)])
    if pattern == "poisson":
        gaps = st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=n, max_size=n)
        return gaps.map(lambda us: _cumulative([-mean_gap * math.log1p(-u) for u in us]))
    if pattern == "on_off":
        return st.integers(1, max(1, n)).map(
            lambda size: [(i // size) * mean_gap * size * 2 for i in range(n)])
    raise ValueError(f"pattern must be one of {ARRIVAL_PATTERNS}, got {pattern!r}")


def workloads(*, min_requests: int = 1, max_requests: int = 16, pattern: str | None = None,
              mean_gap: float = 0.1, **spec_options: object) -> st.SearchStrategy[list[RequestSpec]]:
    """A workload: requests from :func:`request_specs` with arrivals from
    :func:`arrival_times`, sorted by arrival."""
    specs = st.lists(request_specs(**spec_options),  # type: ignore[arg-type]
                     min_size=min_requests, max_size=max_requests)
    return specs.flatmap(lambda reqs: arrival_times(len(reqs), pattern, mean_gap=mean_gap).map(
        lambda times: [_at(r, t) for r, t in zip(reqs, times, strict=True)]))


def _at(spec: RequestSpec, arrival: float) -> RequestSpec:
    return attrs.evolve(spec, arrival=arrival)


def _cumulative(gaps: Sequence[float]) -> list[float]:
    out, t = [], 0.0
    for g in gaps:
        t += g
        out.append(t)
    return out
