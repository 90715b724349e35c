"""OpenTelemetry exporter: GenAI semantic-convention metrics and one span per request.

``servekit[otel]``. Metrics (histograms, with the conventions' advised buckets):
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token`` and
``gen_ai.server.request.duration`` (seconds), ``gen_ai.client.token.usage`` (tokens, with
``gen_ai.token.type`` = ``input`` / ``output``). Each request gets one span from its arrival to
its end, with ``scheduled``, ``preempted`` and ``first_token`` events. Providers are injected;
by default the global ones from the OpenTelemetry API are used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from servekit._optional import require
from servekit.metrics.errors import MetricsConfigError
from servekit.metrics.events import (
    FirstToken,
    RequestFinished,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
)
from servekit.metrics.hooks import Hook
from servekit.metrics.stats import OVERFLOW_TENANT, time_per_output_token

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip

_Attrs = dict[str, Any]


class OtelHook(Hook):
    """Records GenAI metrics and per-request spans through OpenTelemetry.

    ``clock`` must be the clock the producers stamp events with (default ``time.monotonic``):
    span times are those stamps shifted onto ``wall_clock_ns`` by the offset taken here.
    """

    def __init__(
        self,
        model_name: str,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        operation_name: str = "chat",
        provider_name: str = "servekit",
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        max_tenants: int = 1000,
    ) -> None:
        metrics_api = require("opentelemetry.metrics", "otel")
        trace_api = require("opentelemetry.trace", "otel")
        if not isinstance(model_name, str) or not model_name:
            raise MetricsConfigError("model_name", f"must be a non-empty str, got {model_name!r}")
        if max_tenants < 1:
            raise MetricsConfigError("max_tenants", f"must be >= 1, got {max_tenants!r}")
        self.model_name = model_name
        self.max_tenants = max_tenants
        self._offset_ns = wall_clock_ns() - round(clock() * 1e9)
        self._base: _Attrs = {
            "gen_ai.operation.name": operation_name,
            "gen_ai.provider.name": provider_name,
            "gen_ai.request.model": model_name,
        }
        self._attrs: dict[str | None, _Attrs] = {None: self._base}
        self._spans: dict[str, Span] = {}
        self._span_name = f"{operation_name} {model_name}"
        self._span_kind = trace_api.SpanKind.INTERNAL
        self._status_error = trace_api.Status(trace_api.StatusCode.ERROR)

        mp = meter_provider if meter_provider is not None else metrics_api.get_meter_provider()
        tp = tracer_provider if tracer_provider is not None else trace_api.get_tracer_provider()
        meter = mp.get_meter("servekit")
        self._tracer = tp.get_tracer("servekit")
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )  # fmt: skip
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token generated after the first token.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )  # fmt: skip
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Generative AI server request duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip

    @property
    def open_spans(self) -> int:
        """Spans of requests that have not finished yet."""
        return len(self._spans)

    def _tenant_attrs(self, tenant: str | None) -> _Attrs:
        attrs = self._attrs.get(tenant)
        if attrs is None:
            label = tenant if len(self._attrs) <= self.max_tenants else OVERFLOW_TENANT
            attrs = {**self._base, "servekit.tenant": label}
            if label == tenant:
                self._attrs[tenant] = attrs
        return attrs

    def _ns(self, t: float) -> int:
        return round(t * 1e9) + self._offset_ns

    def _start(self, request_id: str, tenant: str | None, start: float) -> Span:
        attrs = {**self._tenant_attrs(tenant), "servekit.request_id": request_id}
        span = self._tracer.start_span(
            self._span_name, kind=self._span_kind, attributes=attrs, start_time=self._ns(start)
        )
        self._spans[request_id] = span
        return span

    def on_request_queued(self, event: RequestQueued) -> None:
        span = self._start(event.request_id, event.tenant, event.time)
        span.set_attribute("gen_ai.usage.input_tokens", event.prompt_tokens)

    def on_request_scheduled(self, event: RequestScheduled) -> None:
        span = self._spans.get(event.request_id)
        if span is not None:
            span.add_event(
                "scheduled",
                {"servekit.cached_tokens": event.cached_tokens,
                 "servekit.queue_time": event.time - event.arrival_time},
                timestamp=self._ns(event.time),
            )  # fmt: skip

    def on_request_preempted(self, event: RequestPreempted) -> None:
        span = self._spans.get(event.request_id)
        if span is not None:
            span.add_event("preempted", timestamp=self._ns(event.time))

    def on_first_token(self, event: FirstToken) -> None:
        ttft = event.time - event.arrival_time
        self._ttft.record(ttft, self._tenant_attrs(event.tenant))
        span = self._spans.get(event.request_id)
        if span is not None:
            span.add_event("first_token", {"servekit.ttft": ttft}, timestamp=self._ns(event.time))

    def on_request_finished(self, event: RequestFinished) -> None:
        attrs = self._tenant_attrs(event.tenant)
        duration_attrs = attrs if event.reason != "error" else {**attrs, "error.type": "error"}
        self._duration.record(event.time - event.arrival_time, duration_attrs)
        tpot = time_per_output_token(event)
        if tpot is not None:
            self._tpot.record(tpot, attrs)
        self._tokens.record(event.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        self._tokens.record(event.output_tokens, {**attrs, "gen_ai.token.type": "output"})

        span = self._spans.pop(event.request_id, None)
        if span is None:
            span = self._start(event.request_id, event.tenant, event.arrival_time)
            del self._spans[event.request_id]
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": event.prompt_tokens,
                "gen_ai.usage.output_tokens": event.output_tokens,
                "gen_ai.response.finish_reasons": (event.reason,),
                "servekit.cached_prompt_tokens": event.cached_prompt_tokens,
                "servekit.num_preemptions": event.num_preemptions,
            }
        )
        if event.reason == "error":
            span.set_status(self._status_error)
        span.end(end_time=self._ns(event.time))
