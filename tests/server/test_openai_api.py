"""The OpenAI API against the real server (fake engine), through the official `openai` package."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import Running

TEXT = "the quick brown fox jumps over the lazy dog "


def client(server: Running, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_models_health_ready(fake_server: Running) -> None:
    models = client(fake_server).models.list()
    assert [m.id for m in models.data] == ["fake"]
    assert httpx.get(fake_server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(fake_server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert "/v1/chat/completions" in httpx.get(fake_server.url + "/openapi.json").json()["paths"]


def test_completion_text_usage_and_n(fake_server: Running) -> None:
    out = client(fake_server).completions.create(model="fake", prompt="hello", max_tokens=7, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text == TEXT[:7] and c.finish_reason == "length" for c in out.choices)
    # "hello" is 5 bytes + bos, counted once for the three choices
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 21)
    assert out.usage.total_tokens == 27


def test_completion_batch_of_prompts_and_token_ids(fake_server: Running) -> None:
    out = client(fake_server).completions.create(model="fake", prompt=[[104, 105], [1, 2, 3]],
                                                 max_tokens=2)
    assert len(out.choices) == 2 and out.usage.prompt_tokens == 5


def test_stop_echo_seed_user_and_logprobs(fake_server: Running) -> None:
    c = client(fake_server)
    out = c.completions.create(model="fake", prompt="x", max_tokens=30, stop=["fox"], seed=3,
                               user="u1")
    assert out.choices[0].text == "the quick brown " and out.choices[0].finish_reason == "stop"
    echo = c.completions.create(model="fake", prompt="say:", max_tokens=3, echo=True)
    assert echo.choices[0].text == "say:the"
    lp = c.completions.create(model="fake", prompt="x", max_tokens=3, logprobs=2)
    assert lp.choices[0].logprobs.tokens == ["t", "h", "e"]
    assert lp.choices[0].logprobs.token_logprobs == [-0.5, -0.5, -0.5]
    assert len(lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_chat_with_max_completion_tokens_and_logprobs(fake_server: Running) -> None:
    out = client(fake_server).chat.completions.create(
        model="fake", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}],
        max_completion_tokens=4, logprobs=True, top_logprobs=1, temperature=0.5, top_p=0.9)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == TEXT[:4]
    assert [t.token for t in choice.logprobs.content] == list(TEXT[:4])
    assert out.usage.completion_tokens == 4 and out.usage.prompt_tokens > 0


def test_chat_without_max_tokens_fills_the_context(fake_server: Running) -> None:
    out = client(fake_server).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}])
    assert out.usage.total_tokens == 256 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_matches_whole_and_reports_usage(fake_server: Running, endpoint: str) -> None:
    c = client(fake_server)
    if endpoint == "chat":
        kwargs = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 12}
        whole = c.chat.completions.create(**kwargs)
        chunks = list(c.chat.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        expected = whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kwargs = {"model": "fake", "prompt": "hi", "max_tokens": 12}
        whole = c.completions.create(**kwargs)
        chunks = list(c.completions.create(**kwargs, stream=True,
                                           stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        expected = whole.choices[0].text
    assert text == expected
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_stream_ends_with_done_and_usage_only_when_asked(fake_server: Running) -> None:
    body = {"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": True}
    r = httpx.post(fake_server.url + "/v1/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_stream_n_two_interleaves_both_choices(fake_server: Running) -> None:
    chunks = list(client(fake_server).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
        stream=True))
    for i in (0, 1):
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks
                       if ch.choices and ch.choices[0].index == i)
        assert text == TEXT[:5]
