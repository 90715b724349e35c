"""The hook kit: built-in hooks and exporters pass it; planted bugs fail it by name."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pytest

from servekit.metrics import Hook, HookSet
from servekit.metrics.events import NewTokens
from servekit.metrics.hooks import EVENT_METHODS
from servekit.metrics.logs import RequestLogHook
from servekit.metrics.stats import StatsHook
from servekit.testing import InvariantViolationError
from servekit.testing.hooks import HookContract, hook_contract


class TestStatsHook(HookContract):
    hook_factory = StatsHook


class TestRequestLogHook(HookContract):
    hook_factory = RequestLogHook


def _prometheus() -> Hook:
    from prometheus_client import CollectorRegistry

    from servekit.metrics.prometheus import PrometheusHook

    return PrometheusHook("kit-model", registry=CollectorRegistry())


TestPrometheusHook = hook_contract(_prometheus, max_examples=8)


def _otel() -> Hook:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from servekit.metrics.otel import OtelHook

    return OtelHook("kit-model", meter_provider=MeterProvider(),
                    tracer_provider=TracerProvider())


TestOtelHook = hook_contract(_otel, max_examples=8)


class RaisingHook(Hook):
    def on_new_tokens(self, event: NewTokens) -> None:
        raise KeyError(event.request_id)


class BlockingHook(Hook):
    def on_request_finished(self, event: Any) -> None:
        time.sleep(0.1)  # a synchronous network call, say


class NonIsolatingHookSet(HookSet):
    """Planted bug: dispatches to every hook but lets their exceptions escape."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        super().__init__(hooks)
        for name in EVENT_METHODS:
            bound = [m for m in (getattr(h, name) for h in self.hooks)]

            def dispatch(event: Any, bound: list[Any] = bound) -> None:
                for method in bound:
                    method(event)

            setattr(self, name, dispatch)


class ReorderingHookSet(HookSet):
    """Planted bug: holds token events back and delivers them after the next event."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        super().__init__(hooks)
        self.held: list[Any] = []
        for name in EVENT_METHODS:
            setattr(self, name, self._deferring(name, getattr(self, name)))

    def _deferring(self, name: str, dispatch: Any) -> Any:
        def deliver(event: Any) -> None:
            held, self.held = self.held, []
            if name == "on_new_tokens":
                self.held.append((dispatch, event))
            else:
                dispatch(event)
            for late, late_event in held:
                late(late_event)
        return deliver


def test_raising_hook_fails_never_raises() -> None:
    with pytest.raises(InvariantViolationError, match="the hook never raises") as info:
        hook_contract(RaisingHook, max_examples=5)().test_hook_on_real_serving()
    assert "RaisingHook.on_new_tokens raised KeyError" in str(info.value)


def test_blocking_hook_fails_returns_quickly() -> None:
    with pytest.raises(InvariantViolationError, match="a hook returns quickly"):
        hook_contract(BlockingHook, max_examples=2)().test_hook_on_real_serving()


def test_non_isolating_hook_set_breaks_serving() -> None:
    kit = hook_contract(StatsHook, hookset_factory=NonIsolatingHookSet, max_examples=5)()
    with pytest.raises(InvariantViolationError, match="a raising or slow hook never breaks serving"):
        kit.test_raising_or_slow_hooks_never_break_serving()


def test_reordering_hook_set_fails_event_order() -> None:
    kit = hook_contract(StatsHook, hookset_factory=ReorderingHookSet, max_examples=10)()
    with pytest.raises(InvariantViolationError, match="event order per request"):
        kit.test_hook_on_real_serving()
