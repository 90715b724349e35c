"""Large bodies and slow clients: body limit, prompt bound, tokenizing off the loop, send timeout."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx

from servekit.server import FakeEngine, create_app
from servekit.server.app import ServerConfig
from servekit.server.bounds import MIN_BODY_BYTES, default_max_body_bytes, max_prompt_chars
from servekit.server.fake import FakeTokenizer
from tests.server.conftest import serve, wait_for


def test_a_body_over_the_limit_is_413_with_an_openai_error() -> None:
    app = create_app(FakeEngine(max_model_len=256), config=ServerConfig(max_body_bytes=10_000))
    with serve(app) as server:
        body = {"model": "fake", "prompt": "x" * 20_000, "max_tokens": 1}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 413
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "10000 bytes" in error["message"]

        def chunked() -> Any:  # no content-length: the limit is counted as the body arrives
            data = json.dumps(body).encode()
            for i in range(0, len(data), 4096):
                yield data[i:i + 4096]

        r = httpx.post(server.url + "/v1/completions", content=chunked(),
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(server.url + "/v1/completions",
                        json={"model": "fake", "prompt": "x" * 100, "max_tokens": 1})
        assert ok.status_code == 200


def test_the_default_body_limit_fits_the_longest_context() -> None:
    engine = FakeEngine(max_model_len=4096)
    with serve(create_app(engine)) as server:
        limit = server.service.body_limit
        assert limit == default_max_body_bytes(4096, 1) and limit >= MIN_BODY_BYTES
        # the longest prompt that fits the context goes through (a 400 for its length, not 413)
        prompt = "é" * 4095  # 2 bytes a character in UTF-8, 2 tokens each: too long, but not 413
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": "fake", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": "fake", "prompt": "a" * 4000, "max_tokens": 1})
        assert r.status_code == 200


class _CountingTokenizer(FakeTokenizer):
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)  # a slow tokenizer holds whatever thread runs it
        return super().encode(text, add_special_tokens)


def _engine(tokenizer: FakeTokenizer, max_model_len: int = 4096) -> FakeEngine:
    engine = FakeEngine(max_model_len=max_model_len)
    engine.tokenizer = tokenizer
    return engine


def test_a_prompt_that_cannot_fit_is_rejected_before_it_is_tokenized() -> None:
    tokenizer = _CountingTokenizer()
    with serve(create_app(_engine(tokenizer, 256))) as server:
        bound = max_prompt_chars(256, 1)
        for body in ({"prompt": "x" * (bound + 1)}, {"prompt": ["ok", "x" * (bound + 1)]},
                     {"messages": [{"role": "user", "content": "x" * (bound + 1)}]}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = httpx.post(server.url + path, json={"model": "fake", "max_tokens": 1, **body})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] in ("prompt", "messages")
            assert "characters" in r.json()["error"]["message"]
        assert tokenizer.calls == 0


async def _health_while_posting(url: str, body: dict[str, Any]) -> tuple[int, list[float]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        post = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.sleep(0.3)  # the big request is being tokenized now
        latencies = []
        while not post.done():
            t0 = time.perf_counter()
            r = await client.get("/health")
            assert r.status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        return (await post).status_code, latencies


def test_health_answers_while_a_maximum_size_body_is_tokenized() -> None:
    tokenizer = _CountingTokenizer(delay=2.0)
    with serve(create_app(_engine(tokenizer, 8192))) as server:
        # the longest prompt tokenized at all, in a body padded to the limit
        prompt = "x" * max_prompt_chars(8192, 1)
        body = {"model": "fake", "prompt": prompt, "max_tokens": 1, "user": ""}
        body["user"] = "u" * (server.service.body_limit - len(json.dumps(body)) - 100)
        status, latencies = asyncio.run(_health_while_posting(server.url, body))
        assert status == 400  # too many tokens, found after tokenizing (in a worker thread)
        assert tokenizer.calls == 1 and len(latencies) >= 5
        assert max(latencies) < 0.5, latencies


def test_a_client_that_stops_reading_is_aborted_after_the_send_timeout() -> None:
    engine = FakeEngine(max_model_len=1_000_000)
    app = create_app(engine, config=ServerConfig(send_timeout=0.5))
    with serve(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        body = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 900_000,
                           "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        try:
            wait_for(lambda: engine.num_live_requests == 1)
            # the client reads nothing: the server's sends block, then it gives up
            wait_for(lambda: engine.num_live_requests == 0, timeout=15)
            assert engine.num_used_blocks == 0
            assert server.service.state.in_flight == 0
            assert server.metric("open_streams") == 0
        finally:
            sock.close()


def test_a_connection_that_never_finishes_its_request_head_is_closed() -> None:
    from servekit.server.runner import header_timeout_protocol

    with serve(create_app(FakeEngine(max_model_len=256)),
               http=header_timeout_protocol(0.5)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # ... and never the end
            slow.settimeout(5)
            t0 = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t0 < 3
        # a well-behaved keep-alive client is served, twice on one connection
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/health").status_code == 200
            time.sleep(0.2)
            assert client.get("/health").status_code == 200
