"""``/openapi.json`` tells the truth, checked by reading it and by schemathesis against it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servekit.server import FakeEngine, create_app
from tests.server.conftest import Running, serve

VOCAB, MAX_LEN = 258, 96


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    engine = FakeEngine(max_model_len=MAX_LEN, max_running=64, max_waiting=64)
    with serve(create_app(engine)) as running:
        yield running


def _doc(server: Running) -> dict[str, Any]:
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return dict(r.json())


def test_every_route_documents_its_real_statuses_and_content_types(server: Running) -> None:
    doc = _doc(server)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, methods in doc["paths"].items():
        for op in methods.values():
            assert "422" not in op["responses"], path
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/generate"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "429", "503"} <= set(responses), path
        assert "schema" in responses["429"]["content"]["application/json"]
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(completions) == {"application/json", "text/event-stream"}
    stream = doc["paths"]["/v1/generate:stream"]["post"]
    assert "application/x-ndjson" in stream["responses"]["200"]["content"]
    assert stream["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/GenerateRequest")
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def test_the_document_carries_the_served_models_bounds(server: Running) -> None:
    schemas = _doc(server)["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["model"]["enum"] == ["fake"]
    prompt = completion["prompt"]["anyOf"]
    ids = next(s for s in prompt if s.get("items", {}).get("type") == "integer")
    assert ids["items"]["maximum"] == VOCAB - 1 and ids["maxItems"] == MAX_LEN - 1
    assert all(s.get("minLength", s.get("minItems")) == 1 for s in prompt)
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == MAX_LEN - 1
    chat = schemas["ChatCompletionRequest"]
    assert chat["then"]["properties"]["logprobs"] == {"const": True}
    assert schemas["TokenIds"]["properties"]["ids"]["items"]["maximum"] == VOCAB - 1


@pytest.mark.slow
def test_schemathesis_finds_no_failure(server: Running) -> None:
    """All response checks, positive and negative data, a fixed seed and example count."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.config import SchemathesisConfig
    from schemathesis.specs.openapi import checks as openapi_checks

    config = SchemathesisConfig.from_dict({
        "seed": 21, "generation": {"mode": "all", "max-examples": 100, "deterministic": True}})
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)
    checks = [schemathesis.checks.not_a_server_error, openapi_checks.status_code_conformance,
              openapi_checks.content_type_conformance,
              openapi_checks.response_schema_conformance,
              openapi_checks.response_headers_conformance,
              openapi_checks.negative_data_rejection]
    calls: dict[str, int] = {}
    from schemathesis import GenerationMode

    for result, mode in itertools.product(schema.get_all_operations(), GenerationMode):
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters, no body: nothing can be made invalid
        test = operation.as_strategy(generation_mode=mode)

        @settings(max_examples=100, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=test)
        def run(case: Any) -> None:
            calls[case.meta.generation.mode.value] = calls.get(
                case.meta.generation.mode.value, 0) + 1
            case.call_and_validate(base_url=server.url, checks=checks)

        run()
    print(calls)
    assert calls.get("positive", 0) > 100 and calls.get("negative", 0) > 100, calls
