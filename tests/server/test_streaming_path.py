"""The per-token streaming path: one event per token for a client that keeps up, merged deltas
for one that falls behind (nothing lost, bytes identical), and the raw-send shortcut only where
no middleware needs to see the body."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.sched.params import SamplingParams
from servekit.server import create_app
from servekit.server.app import ServerConfig
from servekit.server.cli import DEMO_MODEL
from servekit.server.fake import FakeEngine
from servekit.server.responses import ChatEncoder, CompletionEncoder
from servekit.server.service import GenerationService, Job
from tests.server.conftest import Running, serve
from tests.server.test_real_engine import MODEL, client, server  # noqa: F401  (the fixture)


def test_a_fast_client_gets_one_event_per_token_and_the_whole_text(
        server: Running) -> None:  # noqa: F811
    c = client(server)
    messages = [{"role": "user", "content": "Speak, good sir."}]
    kwargs = dict(model=MODEL, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2,
                  messages=messages, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))  # type: ignore[call-overload]
    deltas = [ch for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert len(deltas) == whole.usage.completion_tokens == 20  # one event per token
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        whole.choices[0].message.content
    assert [e.token for ch in deltas for e in ch.choices[0].logprobs.content] == \
        [e.token for e in whole.choices[0].logprobs.content]
    usage = chunks[-1].usage  # the second run may hit the prefix cache: cached tokens differ
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 20)


async def _run(service: GenerationService, prompt: list[int], slow: bool) -> list[RequestOutput]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    job = Job(service.new_request_id("cmpl"), MODEL, None, [prompt], [(0, params)])
    await service.admit(job)
    seen: list[RequestOutput] = []

    async def on_output(i: int, out: RequestOutput) -> None:
        seen.append(out)
        if slow and len(seen) == 1:  # a send blocked on a client that stopped reading
            await anyio.sleep(0.5)

    await service.run(job, on_output)
    assert job.usage.completion_tokens == 24 and job.finish_reasons == ["length"]
    return seen


@pytest.mark.anyio
async def test_a_stream_that_falls_behind_sends_merged_deltas_and_loses_nothing() -> None:
    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(
        num_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)))
    service = GenerationService(engine)
    service.state.set_ready()
    prompt = engine.tokenizer.encode("ROMEO:")
    async with engine:
        fast = await _run(service, prompt, slow=False)
        slow = await _run(service, prompt, slow=True)
    assert [len(o.new_token_ids) for o in fast] == [1] * 24
    assert len(slow) < len(fast)  # the deltas generated during the stall came as one
    assert "".join(o.new_text for o in slow) == "".join(o.new_text for o in fast)
    assert [t for o in slow for t in o.new_token_ids] == [t for o in fast for t in o.new_token_ids]


class _Tagging:
    """A user middleware that rewrites each streamed body part (appends an SSE comment)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("path") != "/v1/completions":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": message["body"] + b": seen\n\n"}
            await send(message)

        await self.app(scope, receive, tagged)


@pytest.mark.parametrize("rewriting", [False, True])
def test_streams_go_through_a_user_middleware_that_rewrites_bodies(rewriting: bool) -> None:
    app = create_app(FakeEngine(model_name="fake"))
    if rewriting:  # every part of the stream must pass through it, not around it
        app.add_middleware(_Tagging)
    body = {"model": "fake", "prompt": "hi", "max_tokens": 40, "stream": True}
    with serve(app) as running:
        text = httpx.post(running.url + "/v1/completions", json=body).text
    parts = [p for p in text.split("\n\n") if p]
    events = [p.removeprefix("data: ") for p in parts if p.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 41  # 40 tokens, one event each
    assert parts.count(": seen") == (len(events) if rewriting else 0)
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == \
        "the quick brown fox jumps over the lazy dog the quick brown f"[:40]


@given(text=st.text(max_size=8), include_usage=st.booleans(), chat=st.booleans(),
       choice=st.integers(0, 2))
def test_a_text_delta_event_is_the_openai_chunk_for_any_text(text: str, include_usage: bool,
                                                             chat: bool, choice: int) -> None:
    engine = FakeEngine()
    params = SamplingParams(max_tokens=4)
    job = Job("chatcmpl-1" if chat else "cmpl-1", "fake", None, [[1]], [(0, params)] * 3)
    encoder = (ChatEncoder if chat else CompletionEncoder)(job, engine.tokenizer,
                                                           include_usage=include_usage)
    event = encoder.chunk(choice, RequestOutput("r", [1], text, False, None, 1, 1, 0))
    if not text:
        assert event == b""
        return
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    delta = {"delta": {"content": text}} if chat else {"text": text}
    expected = {"id": job.request_id, "created": job.created, "model": "fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "choices": [{"index": choice, **delta, "logprobs": None, "finish_reason": None}],
                **({"usage": None} if include_usage else {})}
    assert json.loads(event[6:]) == expected


@given(texts=st.lists(st.text(max_size=4), min_size=1, max_size=6), chat=st.booleans(),
       finished=st.booleans(), with_logprobs=st.booleans(), include_usage=st.booleans())
def test_the_events_of_a_batch_are_its_deltas_events_byte_for_byte(
        texts: list[str], chat: bool, finished: bool, with_logprobs: bool,
        include_usage: bool) -> None:
    engine = FakeEngine()
    job = Job("chatcmpl-1" if chat else "cmpl-1", "fake", None, [[1]],
              [(0, SamplingParams(max_tokens=8, logprobs=1 if with_logprobs else None))] * 2)
    encoder = (ChatEncoder if chat else CompletionEncoder)(
        job, engine.tokenizer, include_usage=include_usage, logprobs=with_logprobs)
    outs = [RequestOutput("r", [97], text, finished and k == len(texts) - 1,
                          "length" if finished and k == len(texts) - 1 else None, 1, k + 1, 0,
                          [TokenLogprob(97, -0.5, ((97, -0.5),))] if with_logprobs else None)
            for k, text in enumerate(texts)]
    assert encoder.chunks(1, outs) == b"".join(encoder.chunk(1, o) for o in outs)


async def _sse(app: Any, body: dict[str, Any], send_s: float,
               parts: list[bytes] | None = None) -> list[dict[str, Any]]:
    """POST ``body`` to the ASGI ``app``; each body part takes ``send_s`` to send (a client that
    reads slowly: a blocked send is what flow control does). The stream's JSON events (the body
    messages go into ``parts``)."""
    data = json.dumps(body).encode()
    parts = [] if parts is None else parts
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": data, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            await anyio.sleep(send_s)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    await app(scope, receive, send)
    events = [e.removeprefix("data: ") for e in b"".join(parts).decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.anyio
async def test_over_http_a_slow_reader_gets_merged_events_and_a_fast_one_an_event_per_token(
        ) -> None:
    import openai.types.chat as oai

    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(
        num_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)))
    app = create_app(engine, config=ServerConfig(model_names=(MODEL,)))
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "messages": [{"role": "user", "content": "Speak, good sir."}]}
    async with app.router.lifespan_context(app):
        while not app.state.servekit.state.ready:
            await anyio.sleep(0.01)
        fast = await _sse(app, body, 0.0)
        slow = await _sse(app, body, 0.03)  # ~30 ms per event: steps pile up behind it

    def deltas(events: list[dict[str, Any]]) -> list[oai.ChatCompletionChunk]:
        chunks = [oai.ChatCompletionChunk.model_validate(e) for e in events]  # openai's types
        return [c for c in chunks if c.choices and c.choices[0].logprobs]

    fast_d, slow_d = deltas(fast), deltas(slow)
    assert len(fast_d) == 32  # a reader that keeps up: one event per token
    assert len(slow_d) < len(fast_d)  # one that falls behind: several tokens per event
    assert any(len(d.choices[0].logprobs.content or []) > 1 for d in slow_d)  # type: ignore[union-attr]

    def text(ds: list[oai.ChatCompletionChunk]) -> str:
        return "".join(d.choices[0].delta.content or "" for d in ds)

    def tokens(ds: list[oai.ChatCompletionChunk]) -> list[tuple[str, int]]:
        return [(e.token, len(e.top_logprobs)) for d in ds
                for e in d.choices[0].logprobs.content or []]  # type: ignore[union-attr]

    def logprobs(ds: list[oai.ChatCompletionChunk]) -> list[float]:
        return [e.logprob for d in ds
                for e in d.choices[0].logprobs.content or []]  # type: ignore[union-attr]

    assert text(slow_d) == text(fast_d) != ""
    assert tokens(slow_d) == tokens(fast_d) and len(tokens(slow_d)) == 32
    # the same logprobs, up to float noise (the second run finds the prompt in the prefix cache)
    assert logprobs(slow_d) == pytest.approx(logprobs(fast_d), abs=1e-4)
    assert slow_d[-1].choices[0].finish_reason == fast_d[-1].choices[0].finish_reason == "length"
    assert slow[-1]["usage"]["completion_tokens"] == fast[-1]["usage"]["completion_tokens"] == 32


async def _fake_stream(engine: FakeEngine, body: dict[str, Any]
                       ) -> tuple[list[dict[str, Any]], list[bytes]]:
    app = create_app(engine)
    parts: list[bytes] = []
    async with app.router.lifespan_context(app):
        while not app.state.servekit.state.ready:
            await anyio.sleep(0.01)
        events = await _sse(app, body, 0.0, parts)
    return events, [p for p in parts if p]


_CHAT = {"model": "fake", "max_tokens": 40, "stream": True, "messages": [
    {"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}


@pytest.mark.anyio
@pytest.mark.parametrize("per_pass", [1, 8, 40])
async def test_the_deltas_ready_together_go_out_in_one_message_one_event_each(
        per_pass: int) -> None:
    events, parts = await _fake_stream(FakeEngine(tokens_per_yield=per_pass), _CHAT)
    deltas = [e for e in events if e["choices"] and "content" in e["choices"][0]["delta"]
              and e["choices"][0]["delta"]["content"]]
    assert len(deltas) == 40  # one event per token, however many were ready at once
    assert "".join(e["choices"][0]["delta"]["content"] for e in deltas) == \
        ("the quick brown fox jumps over the lazy dog " * 2)[:40]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 40
    # one message per pass of the loop (the first with the role chunk), then the usage + [DONE]
    assert len(parts) == -(-40 // per_pass) + 1


class _FailingMidBatch(FakeEngine):
    """Yields one batch: two text deltas, then the engine's error for the request."""

    async def generate(self, prompt: Any, params: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        rid = kwargs.get("request_id") or "r"
        yield [RequestOutput(rid, [116], "t", False, None, 3, 1, 0),
               RequestOutput(rid, [104], "h", False, None, 3, 2, 0),
               RequestOutput(rid, [], "", True, "error", 3, 2, 0, error="the GPU fell over")]


@pytest.mark.anyio
async def test_the_deltas_before_an_error_in_the_same_batch_are_sent_then_the_error() -> None:
    events, _ = await _fake_stream(_FailingMidBatch(), _CHAT)
    texts = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    assert texts == ["", "t", "h"]  # the role chunk, then both deltas
    assert "the GPU fell over" in events[-1]["error"]["message"]


@pytest.mark.anyio
async def test_an_error_as_the_first_delta_is_an_error_status_not_a_stream() -> None:
    class FailingAtOnce(FakeEngine):
        async def generate(self, prompt: Any, params: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            yield [RequestOutput(kwargs.get("request_id") or "r", [], "", True, "error", 3, 0, 0,
                                 error="no GPU")]

    app = create_app(FailingAtOnce())
    with serve(app) as running:
        reply = httpx.post(running.url + "/v1/chat/completions", json=_CHAT)
    assert reply.status_code == 500 and "no GPU" in reply.json()["error"]["message"]
