"""OpenTelemetry spans of the gateway: one per client request, the replica attempts as its
children, through a SIGKILL failover (real replica processes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from servekit.gateway import GatewayTracer, create_gateway
from tests.asgi_server import serve_asgi
from tests.gateway.test_failover import SECRET, _requests, _run, _wait_ready
from tests.server.cli_server import cli_servers

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_span_per_request_with_its_attempts_as_children(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEKIT_GATEWAY_SECRET", SECRET)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with ExitStack() as stack:
        replicas = stack.enter_context(cli_servers(*[["--fake", "--fake-token-delay", "0.02"]] * 2))
        gw = stack.enter_context(serve_asgi(create_gateway(
            [r.url for r in replicas], secret=SECRET, probe_interval=0.1,
            tracer=GatewayTracer(provider))))
        _wait_ready(gw)
        r = httpx.post(gw + "/v1/completions", timeout=10, headers={"traceparent": PARENT},
                       json={"model": "fake", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200
        bad = httpx.post(gw + "/v1/completions", timeout=10, json={
            "model": "fake", "prompt": "x", "servekit_resume": {}})
        assert bad.status_code == 400
        (result,), killed = asyncio.run(_run(gw, _requests("fake", 60, {})[:1],
                                             kill_from=replicas))
        assert killed is not None and result.done
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in requests] == ["POST /v1/completions"] * 3
    children: dict[int, list[str]] = {}
    for s in spans:
        if s.kind is SpanKind.CLIENT:
            assert s.parent is not None
            children.setdefault(s.parent.span_id, []).append(
                f'{s.attributes["servekit.attempt.reason"]}:{s.attributes["servekit.outcome"]}')
    plain, refused, streamed = requests
    assert children.get(plain.context.span_id) == ["first:200"]
    assert plain.attributes["http.response.status_code"] == 200
    assert plain.attributes["gen_ai.request.model"] == "fake"
    # a child of the client's own trace
    assert plain.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert plain.parent is not None and plain.parent.span_id == 0xB7AD6B7169203331
    assert refused.context.span_id not in children  # refused at the edge: no attempt
    assert refused.attributes["http.response.status_code"] == 400
    # cut on the killed replica, finished by another
    assert children[streamed.context.span_id] == ["first:stream_cut", "resume:stream_ok"]
    assert streamed.attributes["servekit.failovers"] == 1
    assert streamed.attributes["servekit.attempts"] == 2
    assert streamed.attributes["servekit.stream"] is True
    assert streamed.status.status_code is not StatusCode.ERROR
    cut = next(s for s in spans if s.kind is SpanKind.CLIENT
               and s.attributes["servekit.outcome"] == "stream_cut")
    assert cut.attributes["servekit.replica"] == killed.url
    assert cut.status.status_code is StatusCode.ERROR
    # the request span ends after its stream's last byte, after every attempt
    assert streamed.end_time >= max(s.end_time for s in spans if s.kind is SpanKind.CLIENT
                                    and s.parent.span_id == streamed.context.span_id)
