"""A scripted request lifecycle on a fake clock, shared by the metrics tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from servekit.metrics import EngineStep, Hook, RequestFinished
from servekit.metrics.events import (
    CacheStats,
    FirstToken,
    NewTokens,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
)

Lifecycle = Callable[..., None]


def run_lifecycle(
    hook: Hook, request_id: str = "r1", tenant: str | None = "acme", t0: float = 100.0
) -> None:
    """One request, timestamps relative to ``t0``.

    queued 0.0 -> scheduled 0.5 (queue 0.5) -> first token 1.0 (TTFT 1.0) -> 1 token at 1.1
    -> preempted 1.2 -> 2 tokens at 1.3 (ITL 0.1 each) -> finished 1.5 (e2e 1.5),
    output 4 tokens, TPOT (1.5 - 1.0) / 3.
    """
    hook.on_request_queued(RequestQueued(request_id, tenant, 12, t0))
    hook.on_request_scheduled(RequestScheduled(request_id, tenant, t0, 4, t0 + 0.5))
    hook.on_engine_step(EngineStep(1, 12, 1, 0, 0.25, t0 + 0.75))
    hook.on_cache_stats(CacheStats(0.5, 16, 4, t0 + 0.75))
    hook.on_first_token(FirstToken(request_id, tenant, t0, t0 + 1.0))
    hook.on_new_tokens(NewTokens(request_id, tenant, 1, t0 + 1.0, t0 + 1.1))
    hook.on_request_preempted(RequestPreempted(request_id, tenant, t0 + 1.2))
    hook.on_new_tokens(NewTokens(request_id, tenant, 2, t0 + 1.1, t0 + 1.3))
    hook.on_request_finished(
        RequestFinished(request_id, tenant, "stop", 12, 4, 4, 1, t0, t0 + 0.5, t0 + 1.0, t0 + 1.5)
    )


@pytest.fixture
def lifecycle() -> Lifecycle:
    """:func:`run_lifecycle`."""
    return run_lifecycle
