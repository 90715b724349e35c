"""The server on the real engine and the bundled demo model (a tiny trained Llama)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.metrics.hooks import HookSet
from servekit.metrics.prometheus import PrometheusHook
from servekit.server import ApiKey, KeyStore, create_app
from servekit.server.app import ServerConfig
from servekit.server.cli import DEMO_MODEL
from tests.server.conftest import Running, serve, wait_for
from tests.server.test_lifecycle import _soak

MODEL = "servekit-demo"


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    hooks = HookSet()
    metrics = PrometheusHook(MODEL)
    hooks.add(metrics)
    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), hooks=hooks, config=EngineConfig(
        num_blocks=256, max_num_seqs=64, max_num_batched_tokens=1024)))
    keys = KeyStore([ApiKey("sk-soak", tenant="soak", rpm=100_000, tpm=10_000_000)])
    app = create_app(engine, keys=keys, hooks=hooks, metrics=metrics,
                     config=ServerConfig(model_names=(MODEL,)))
    with serve(app) as running:
        yield running


def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-soak", max_retries=0)


def test_completion_chat_and_stream_on_the_demo_model(server: Running) -> None:
    c = client(server)
    greedy = [c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True}) for _ in range(2)]
    assert greedy[0].choices[0].text == greedy[1].choices[0].text != ""
    assert greedy[0].usage.completion_tokens == 24 and greedy[0].usage.prompt_tokens > 1
    seeded = [c.completions.create(model=MODEL, prompt="JULIET:", max_tokens=16, seed=5,
                                   temperature=1.0).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    chat = c.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                     messages=[{"role": "user", "content": "Good morrow!"}])
    assert chat.usage.completion_tokens <= 16 and chat.choices[0].finish_reason in (
        "stop", "length")
    chunks = list(c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == \
        greedy[0].choices[0].text
    assert chunks[-1].usage == greedy[0].usage


def test_logprobs_and_stop_on_the_demo_model(server: Running) -> None:
    c = client(server)
    out = c.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=3,
                                    messages=[{"role": "user", "content": "Speak."}])
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in content)
    long = {"ignore_eos": True}
    whole = c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0,
                                 extra_body=long)
    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0,
                               stop=[stop], extra_body=long)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_prompt_longer_than_the_model_is_400(server: Running) -> None:
    r = httpx.post(server.url + "/v1/completions", headers={"authorization": "Bearer sk-soak"},
                   json={"model": MODEL, "prompt": "ROMEO: " * 400, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert client(server).completions.create(model=MODEL, prompt="x", max_tokens=2).choices


@pytest.mark.slow
def test_100_streams_with_disconnects_free_every_block(server: Running) -> None:
    done, cut = asyncio.run(_soak(server.url, 100, seed=11, model=MODEL, max_tokens=16))
    assert done + cut == 100 and done > 0 and cut > 0
    wait_for(lambda: server.metric("kv_blocks_in_use") == 0, timeout=30)
    assert server.metric("rate_limit_reservations") == 0
    assert server.metric("open_streams") == 0


@pytest.mark.parametrize("extra", [{"temperature": 1e-39}, {"temperature": 5e-324},
                                   {"top_p": 1e-46, "temperature": 1.0, "seed": 3},
                                   {"repetition_penalty": 1e-40, "temperature": 0}])
def test_underflowing_sampling_values_are_clamped_to_the_floor(server: Running,
                                                               extra: dict[str, float]) -> None:
    """temperature under 1e-5 is greedy; top_p under it keeps the top token: never pad tokens."""
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 12, "ignore_eos": True}
    greedy = httpx.post(server.url + "/v1/completions", headers={"authorization": "Bearer sk-soak"},
                        json={**body, "temperature": 0})
    r = httpx.post(server.url + "/v1/completions", headers={"authorization": "Bearer sk-soak"},
                   json={**body, **extra})
    assert r.status_code == 200, r.text
    if "repetition_penalty" not in extra:
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    tokenizer = server.service.engine.tokenizer
    ids = tokenizer.encode(r.json()["choices"][0]["text"], add_special_tokens=False)
    assert tokenizer.pad_token_id not in ids or tokenizer.pad_token_id is None
