"""PrometheusHook: a scrape parses, carries vLLM's names and the labels, and the right values."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from servekit.errors import MissingExtraError
from servekit.metrics import HookSet, MetricsConfigError, PrometheusHook
from servekit.metrics.events import (
    KV_BLOCKS_IN_USE,
    OPEN_STREAMS,
    RATE_LIMIT_RESERVATIONS,
    CacheStats,
    NewTokens,
    RateLimitDecision,
    ResourceGauge,
    RouteDecision,
)
from servekit.metrics.prometheus import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS

Lifecycle = Callable[..., None]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0]  # fmt: skip
VLLM_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def scrape(hook: PrometheusHook) -> tuple[dict[str, Any], Samples]:
    """Parse the exposition text: families by name, and samples by (name, sorted labels)."""
    families = {f.name: f for f in text_string_to_metric_families(hook.render().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    return families, samples


def lbl(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_buckets_are_vllms() -> None:
    assert list(TTFT_BUCKETS) == VLLM_TTFT
    assert list(ITL_BUCKETS) == VLLM_ITL
    assert list(REQUEST_LATENCY_BUCKETS) == VLLM_LATENCY


def test_scrape_names_types_and_labels(lifecycle: Lifecycle) -> None:
    hook = PrometheusHook("tiny-llama")
    lifecycle(HookSet([hook]))
    families, samples = scrape(hook)
    expected = {
        "servekit_time_to_first_token_seconds": "histogram",
        "servekit_inter_token_latency_seconds": "histogram",
        "servekit_request_queue_time_seconds": "histogram",
        "servekit_e2e_request_latency_seconds": "histogram",
        "servekit_request_time_per_output_token_seconds": "histogram",
        "servekit_prompt_tokens": "counter",
        "servekit_generation_tokens": "counter",
        "servekit_num_preemptions": "counter",
        "servekit_request_success": "counter",
        "servekit_prefix_cache_queries": "counter",
        "servekit_prefix_cache_hits": "counter",
        "servekit_rate_limit_decisions": "counter",
        "servekit_route_decisions": "counter",
        "servekit_kv_cache_usage_perc": "gauge",
        "servekit_num_requests_running": "gauge",
        "servekit_num_requests_waiting": "gauge",
        "servekit_kv_blocks_in_use": "gauge",
        "servekit_rate_limit_reservations": "gauge",
        "servekit_open_streams": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    req = {"model_name": "tiny-llama", "tenant": "acme"}
    eng = {"model_name": "tiny-llama"}
    ttft = "servekit_time_to_first_token_seconds"
    assert samples[ttft + "_bucket", lbl(**req, le="0.75")] == 0
    assert samples[ttft + "_bucket", lbl(**req, le="1.0")] == 1
    assert samples[ttft + "_count", lbl(**req)] == 1
    assert samples[ttft + "_sum", lbl(**req)] == pytest.approx(1.0)
    itl = "servekit_inter_token_latency_seconds"
    assert samples[itl + "_count", lbl(**req)] == 3
    assert samples[itl + "_sum", lbl(**req)] == pytest.approx(0.3)
    assert samples[itl + "_bucket", lbl(**req, le="0.075")] == 0
    assert samples[itl + "_bucket", lbl(**req, le="0.15")] == 3
    queue = "servekit_request_queue_time_seconds"
    assert samples[queue + "_bucket", lbl(**req, le="0.5")] == 1
    assert samples[queue + "_sum", lbl(**req)] == pytest.approx(0.5)
    e2e = "servekit_e2e_request_latency_seconds"
    assert samples[e2e + "_bucket", lbl(**req, le="1.0")] == 0
    assert samples[e2e + "_bucket", lbl(**req, le="1.5")] == 1
    assert samples["servekit_num_preemptions_total", lbl(**req)] == 1
    assert samples["servekit_generation_tokens_total", lbl(**req)] == 4
    assert samples["servekit_prompt_tokens_total", lbl(**req)] == 12
    assert samples["servekit_request_success_total", lbl(**req, finished_reason="stop")] == 1
    assert samples["servekit_prefix_cache_queries_total", lbl(**eng)] == 16
    assert samples["servekit_prefix_cache_hits_total", lbl(**eng)] == 4
    assert samples["servekit_kv_cache_usage_perc", lbl(**eng)] == 0.5
    assert samples["servekit_num_requests_running", lbl(**eng)] == 1
    assert samples["servekit_iteration_tokens_count", lbl(**eng)] == 1


def test_prefix_tenant_overflow_and_isolated_registries(lifecycle: Lifecycle) -> None:
    a = PrometheusHook("m", prefix="llm_", max_tenants=2)
    b = PrometheusHook("m")  # a second exporter: its own registry, no duplicate-name clash
    for i, tenant in enumerate(["t0", None, "t2", "t3"]):
        lifecycle(a, f"r{i}", tenant)
    _, samples = scrape(a)
    tenants = {
        dict(labels)["tenant"]: v
        for (name, labels), v in samples.items()
        if name == "llm_generation_tokens_total"
    }
    assert tenants == {"t0": 4, "": 4, "__other__": 8}
    _, empty = scrape(b)
    assert not any(name.startswith("llm_") for name, _ in empty)
    assert ("servekit_generation_tokens_total", lbl(model_name="m", tenant="t0")) not in empty


def test_shared_registry_is_used_when_given() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook("m", registry=registry)
    assert hook.registry is registry
    hook.on_new_tokens(NewTokens("r", None, 1, 0.0, 0.02))
    assert (
        registry.get_sample_value(
            "servekit_generation_tokens_total", {"model_name": "m", "tenant": ""}
        )
        == 1
    )
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusHook("m", registry=registry)


def test_leak_gauges_rate_limits_routes_and_kv_events() -> None:
    hook = PrometheusHook("m")
    hooks = HookSet([hook])
    hooks.on_resource_gauge(ResourceGauge(KV_BLOCKS_IN_USE, 7, 0.0))
    hooks.on_resource_gauge(ResourceGauge(OPEN_STREAMS, 2, 0.0))
    hooks.on_resource_gauge(ResourceGauge("grpc_streams", 1, 0.0))  # a new name is allowed
    hooks.on_resource_gauge(ResourceGauge("bad name!", 1, 0.0))  # rejected, isolated
    hook.set_resource(RATE_LIMIT_RESERVATIONS, 5)
    hooks.on_rate_limit(RateLimitDecision("k", False, 2.0, False, 0.0, tenant="t"))
    hooks.on_rate_limit(RateLimitDecision("k", True, 0.0, True, 0.0, tenant="t"))
    hooks.on_route(RouteDecision("s", "node-a", 0, 0.0))
    hooks.on_route(RouteDecision("s", "node-b", 2, 0.0))

    class BlockStored:
        block_hashes = (1, 2)

    hooks.on_kv_event(BlockStored())
    hooks.on_cache_stats(CacheStats(0.25, 10, 5, 0.0))
    hooks.on_cache_stats(CacheStats(0.25, 4, 1, 1.0))  # producer restarted
    _, s = scrape(hook)
    m = {"model_name": "m"}
    assert s["servekit_kv_blocks_in_use", lbl(**m)] == 7
    assert s["servekit_open_streams", lbl(**m)] == 2
    assert s["servekit_rate_limit_reservations", lbl(**m)] == 5
    assert s["servekit_grpc_streams", lbl(**m)] == 1
    assert sum(hooks.errors.values()) == 1
    rl = "servekit_rate_limit_decisions_total"
    assert s[rl, lbl(**m, tenant="t", decision="rejected", shadow="false")] == 1
    assert s[rl, lbl(**m, tenant="t", decision="allowed", shadow="true")] == 1
    assert s["servekit_route_decisions_total", lbl(**m, node="node-b", fallback="true")] == 1
    assert s["servekit_kv_blocks_stored_total", lbl(**m)] == 2
    assert s["servekit_prefix_cache_queries_total", lbl(**m)] == 14
    assert s["servekit_prefix_cache_hits_total", lbl(**m)] == 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_name": ""}, "model_name"),
        ({"model_name": "m", "prefix": "9bad"}, "prefix"),
        ({"model_name": "m", "prefix": "a-b"}, "prefix"),
        ({"model_name": "m", "max_tenants": 0}, "max_tenants"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(MetricsConfigError) as info:
        PrometheusHook(**kwargs)
    assert info.value.field == field and field in str(info.value)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingExtraError, match=r"servekit\[prometheus\]"):
        PrometheusHook("m")


def test_asgi_app_serves_the_registry() -> None:
    hook = PrometheusHook("m")
    hook.on_new_tokens(NewTokens("r", "t", 3, 0.0, 0.3))
    app = hook.asgi_app()
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
                 "headers": []}  # fmt: skip
        await app(scope, receive, send)

    anyio.run(call)
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert b'servekit_generation_tokens_total{model_name="m",tenant="t"} 3.0' in body


@settings(max_examples=40)
@given(st.lists(st.tuples(st.integers(1, 8), st.floats(0.0, 3.0)), max_size=30))
def test_itl_buckets_match_a_brute_force_count(steps: list[tuple[int, float]]) -> None:
    hook = PrometheusHook("m")
    t = 0.0
    values: list[tuple[float, int]] = []
    for n, gap in steps:
        hook.on_new_tokens(NewTokens("r", None, n, t, t + gap))
        values.append(((t + gap - t) / n, n))
        t += gap
    _, s = scrape(hook)
    labels = {"model_name": "m", "tenant": ""}
    if not steps:
        assert ("servekit_inter_token_latency_seconds_count", lbl(**labels)) not in s
        return
    for bound in VLLM_ITL:
        want = sum(n for v, n in values if v <= bound)
        got = s["servekit_inter_token_latency_seconds_bucket", lbl(**labels, le=str(bound))]
        assert got == want
    total = sum(n for n, _ in steps)
    assert s["servekit_inter_token_latency_seconds_count", lbl(**labels)] == total
    assert s["servekit_generation_tokens_total", lbl(**labels)] == total
    assert s["servekit_inter_token_latency_seconds_sum", lbl(**labels)] == pytest.approx(
        sum(v * n for v, n in values)
    )


def test_naming_styles() -> None:
    assert PrometheusHook("m").prefix == "servekit_"
    vllm = PrometheusHook("m", style="vllm")
    assert vllm.prefix == "vllm:" and b"# TYPE vllm:iteration_tokens_total histogram" in vllm.render()
    assert b"# TYPE servekit_iteration_tokens histogram" in PrometheusHook("m").render()
    assert PrometheusHook("m", style="vllm", prefix="x:").prefix == "x:"
    with pytest.raises(MetricsConfigError, match="style"):
        PrometheusHook("m", style="statsd")  # type: ignore[arg-type]
