"""OtelHook through the SDK's in-memory metric reader and span exporter."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from servekit.errors import MissingExtraError
from servekit.metrics import HookSet, MetricsConfigError, OtelHook, RequestFinished

Lifecycle = Callable[..., None]
WALL0 = 1_700_000_000_000_000_000  # the fake wall clock at hook creation, ns
CLOCK0 = 100.0  # the fake monotonic clock at hook creation, s


@pytest.fixture
def otel() -> tuple[OtelHook, InMemoryMetricReader, InMemorySpanExporter]:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    hook = OtelHook(
        "tiny-llama",
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
        clock=lambda: CLOCK0,
        wall_clock_ns=lambda: WALL0,
    )
    return hook, reader, spans


def points(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: (m.unit, list(m.data.data_points))
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_genai_metrics(otel: Any, lifecycle: Lifecycle) -> None:
    hook, reader, _ = otel
    lifecycle(HookSet([hook]))
    got = points(reader)
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "servekit",
        "gen_ai.request.model": "tiny-llama",
        "servekit.tenant": "acme",
    }
    unit, (ttft,) = got["gen_ai.server.time_to_first_token"]
    assert unit == "s" and dict(ttft.attributes) == base
    assert ttft.count == 1 and ttft.sum == pytest.approx(1.0)
    assert list(ttft.explicit_bounds)[:3] == [0.001, 0.005, 0.01]
    _, (tpot,) = got["gen_ai.server.time_per_output_token"]
    assert tpot.sum == pytest.approx(0.5 / 3)
    _, (duration,) = got["gen_ai.server.request.duration"]
    assert duration.sum == pytest.approx(1.5)
    unit, usage = got["gen_ai.client.token.usage"]
    assert unit == "{token}"
    by_type = {p.attributes["gen_ai.token.type"]: p.sum for p in usage}
    assert by_type == {"input": 12, "output": 4}


def test_one_span_per_request_with_events(otel: Any, lifecycle: Lifecycle) -> None:
    hook, _, exporter = otel
    lifecycle(hook, "a", "acme", 100.0)
    lifecycle(hook, "b", None, 200.0)
    spans = {s.attributes["servekit.request_id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"a", "b"} and hook.open_spans == 0
    a = spans["a"]
    assert a.name == "chat tiny-llama"
    assert a.start_time == WALL0  # queued at t0 = CLOCK0
    assert a.end_time - a.start_time == 1_500_000_000
    assert [e.name for e in a.events] == ["scheduled", "first_token", "preempted"]
    assert a.events[0].attributes["servekit.cached_tokens"] == 4
    assert a.events[1].timestamp - a.start_time == 1_000_000_000
    assert a.attributes["gen_ai.usage.input_tokens"] == 12
    assert a.attributes["gen_ai.usage.output_tokens"] == 4
    assert tuple(a.attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a.attributes["servekit.num_preemptions"] == 1
    assert a.attributes["servekit.tenant"] == "acme"
    assert "servekit.tenant" not in spans["b"].attributes
    assert a.status.status_code is StatusCode.UNSET


def test_error_and_unseen_request(otel: Any) -> None:
    hook, reader, exporter = otel
    # finished without a queued event (hook attached mid-flight): one span, from arrival
    hook.on_request_finished(
        RequestFinished("x", "t", "error", 5, 0, 0, 0, 101.0, None, None, 103.0)
    )
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.end_time - span.start_time == 2_000_000_000
    _, (duration,) = points(reader)["gen_ai.server.request.duration"]
    assert duration.attributes["error.type"] == "error"
    assert "gen_ai.server.time_per_output_token" not in points(reader)


def test_tenant_attribute_is_bounded() -> None:
    reader = InMemoryMetricReader()
    hook = OtelHook("m", meter_provider=MeterProvider(metric_readers=[reader]), max_tenants=1)
    for i in range(4):
        hook.on_request_finished(
            RequestFinished(f"r{i}", f"t{i}", "stop", 1, 1, 0, 0, 0.0, 0.0, 0.0, 1.0)
        )
    _, duration = points(reader)["gen_ai.server.request.duration"]
    assert {p.attributes["servekit.tenant"] for p in duration} == {"t0", "__other__"}


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MetricsConfigError, match="model_name"):
        OtelHook("")
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
    with pytest.raises(MissingExtraError, match=r"servekit\[otel\]"):
        OtelHook("m")
