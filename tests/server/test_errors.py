"""Bad requests get OpenAI-shaped errors with the right status, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servekit.server import ApiKey, FakeEngine, KeyStore, create_app
from tests.server.conftest import Running, serve

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server: Running, path: str, body: object, **headers: str) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content,
                      headers={"content-type": "application/json", **headers})


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD = [
    (CMPL, "{not json", 400, None),
    (CMPL, "[1, 2]", 400, None),
    (CMPL, {"prompt": "x"}, 400, "model"),
    (CMPL, {"model": "fake"}, 400, "prompt"),
    (CMPL, {"model": "fake", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    (CMPL, {"model": "fake", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    (CMPL, {"model": "fake", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (CMPL, {"model": "fake", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"model": "fake", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    (CMPL, {"model": "fake", "prompt": "x" * 300}, 400, "prompt"),
    (CMPL, {"model": "fake", "prompt": [5, 999]}, 400, "prompt"),
    (CMPL, {"model": "fake", "prompt": []}, 400, "prompt"),
    (CMPL, {"model": "fake", "prompt": [[]]}, 400, "prompt"),
    (CMPL, {"model": "fake", "prompt": "x", "temperature": -1}, 400, "temperature"),
    (CMPL, {"model": "fake", "prompt": "x", "top_p": 0}, 400, "top_p"),
    (CMPL, {"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
    (CMPL, {"model": "fake", "prompt": "x", "stream": "yes"}, 400, "stream"),
    (CMPL, {"model": "fake", "prompt": "x", "stop": [1]}, 400, "stop"),
    (CMPL, {"model": "fake", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (CMPL, {"model": "fake", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    (CHAT, {"model": "fake", "messages": []}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": [{"role": "bob", "content": "x"}]}, 400,
     "messages.[0].role"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {**OK_CHAT, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage"),
    (CHAT, {"model": "fake", "messages": [{"role": "user", "content": "x" * 300}]}, 400,
     "messages"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serve(create_app(FakeEngine(max_model_len=256))) as running:
        yield running


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_request_names_the_field(server: Running, path: str, body: object, status: int,
                                     param: str | None) -> None:
    error = assert_error(post(server, path, body), status, param)
    assert error["type"] == "invalid_request_error"
    assert post(server, CHAT, OK_CHAT).status_code == 200  # still serving


def test_unknown_model_is_404(server: Running) -> None:
    assert_error(post(server, CHAT, {**OK_CHAT, "model": "gpt-9"}), 404, "model",
                 "model_not_found")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) \
            .completions.create(model="gpt-9", prompt="x")


def test_unknown_route_is_404_in_openai_shape(server: Running) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(["max_tokens", "temperature", "top_p", "n", "seed", "stream",
                              "logprobs", "stop", "user", "model"]),
       value=st.one_of(st.text(max_size=3), st.booleans(),
                       st.lists(st.booleans(), min_size=1, max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), min_size=1,
                                       max_size=1)))
def test_any_wrong_type_is_a_400_naming_its_field(server: Running, field: str,
                                                  value: object) -> None:
    body = {"model": "fake", "prompt": "x", "max_tokens": 2, field: value}
    if (field in ("stop", "user", "model") and isinstance(value, str)) or (
            field == "stream" and isinstance(value, bool)):
        return  # valid types there (an unknown model is the 404 above)
    r = post(server, CMPL, body)
    assert r.status_code == 400, (field, value, r.text)
    assert r.json()["error"]["param"].split(".")[0] == field


@pytest.fixture(scope="module")
def keyed() -> Iterator[Running]:
    keys = KeyStore([ApiKey("sk-good", tenant="a"), ApiKey("sk-tight", tenant="b", rpm=2),
                     ApiKey("sk-tokens", tenant="c", tpm=100)])
    with serve(create_app(FakeEngine(max_model_len=256), keys=keys)) as running:
        yield running


def test_missing_or_wrong_key_is_401(keyed: Running) -> None:
    assert_error(post(keyed, CHAT, OK_CHAT), 401, None, "invalid_api_key")
    assert_error(post(keyed, CHAT, OK_CHAT, authorization="Bearer sk-bad"), 401, None,
                 "invalid_api_key")
    assert_error(post(keyed, CHAT, OK_CHAT, authorization="Basic sk-good"), 401)
    # authentication comes before body validation
    assert_error(post(keyed, CHAT, "{bad", authorization="Bearer nope"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-bad", max_retries=0) \
            .models.list()
    assert post(keyed, CHAT, OK_CHAT, authorization="Bearer sk-good").status_code == 200


def test_rate_limited_is_429_with_headers(keyed: Running) -> None:
    auth = {"authorization": "Bearer sk-tight"}
    first = post(keyed, CHAT, OK_CHAT, **auth)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert post(keyed, CHAT, OK_CHAT, **auth).status_code == 200
    r = post(keyed, CHAT, OK_CHAT, **auth)
    assert_error(r, 429, None, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    # other keys are not affected
    assert post(keyed, CHAT, OK_CHAT, authorization="Bearer sk-good").status_code == 200


def test_token_limit_counts_prompt_plus_max_tokens(keyed: Running) -> None:
    auth = {"authorization": "Bearer sk-tokens"}
    too_big = post(keyed, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 150}, **auth)
    assert_error(too_big, 429, None, "request_too_large")
    assert too_big.headers["x-should-retry"] == "false"
    ok = post(keyed, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 60}, **auth)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "100"
    # settled with the real usage (2 + 60): 38 tokens left, so 40 more is over
    r = post(keyed, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 40}, **auth)
    assert_error(r, 429, None, "rate_limit_exceeded")
    assert "x-ratelimit-remaining-tokens" in r.headers


def test_queue_full_is_503_with_retry_after() -> None:
    engine = FakeEngine(max_running=1, max_waiting=0, token_delay=0.01)
    with serve(create_app(engine)) as server, httpx.Client(base_url=server.url) as http, \
            http.stream("POST", CMPL, json={"model": "fake", "prompt": "x", "max_tokens": 100,
                                            "stream": True}) as busy:
        assert busy.status_code == 200
        r = post(server, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 2})
        assert_error(r, 503, None, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) \
                .completions.create(model="fake", prompt="x", stream=True, max_tokens=2)


def test_engine_side_parameter_errors_are_400() -> None:
    class Picky(FakeEngine):
        async def generate(self, prompt, params, **kwargs):  # type: ignore[no-untyped-def]
            from servekit.sched.params import InvalidParameterError

            raise InvalidParameterError("stop_token_ids", "token ids must be < 258")
            yield  # an async generator, like the engine

    with serve(create_app(Picky())) as server:
        r = post(server, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 2, "stream": True})
        assert_error(r, 400, "stop_token_ids")
        r = post(server, CMPL, {"model": "fake", "prompt": "x", "max_tokens": 2})
        assert_error(r, 400, "stop_token_ids")
