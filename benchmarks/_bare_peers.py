"""The transport floors the front ends are measured against: no framework, no engine.

* :func:`bare_sse_app`: a raw ASGI app under uvicorn (the same uvicorn, protocol and event
  loop as ``servekit serve``) that answers ``POST /v1/completions`` with ``stream: true`` by
  streaming the fake model's text as OpenAI completion chunks, one SSE event per token, built
  by the same byte template servekit's encoder uses, then ``data: [DONE]``. It writes as fast
  as the transport takes the bytes; ``bare_sse_app(step=n)`` (kind ``sse-step`` for n = 1,
  ``sse-stepN`` else) passes through the event loop once every n tokens, as the consumer of an
  engine making n tokens per request per step does: the floor for servekit's rows with the
  fake making n tokens per pass; ``-joined`` (``sse-joined``, ``sse-stepN-joined``) writes the
  events of a pass in one message, as servekit does with the deltas it finds ready together.
* :func:`serve_bare_grpc`: a bare ``grpc.aio`` server answering ``GenerateStream`` with one
  ``GenerateChunk`` per token (the fake model's bytes), then the final chunk: no merging.

Run as ``python _bare_peers.py sse[-stepN][-joined]|grpc PORT``; each prints
``ready`` once it listens; :class:`PeerProcess` does that for the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from json.encoder import encode_basestring_ascii as quote  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from _common import stop_process

TEXT = b"the quick brown fox jumps over the lazy dog "  # what servekit's FakeEngine generates


def bare_sse_app(step: int = 0, joined: bool = False) -> Any:
    """An ASGI app streaming completion chunks; the floor for the HTTP front end (``step``:
    one pass through the event loop every ``step`` tokens, 0: none; ``joined``: the events of
    a pass in one message)."""
    counter = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal counter
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/ready":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"ready":true}'})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = json.loads(body)
        counter += 1
        rid = f"cmpl-bare{counter:x}"
        head = json.dumps({"id": rid, "object": "text_completion", "created": int(time.time()),
                           "model": request["model"]})[:-1]
        prefix = f'data: {head},"choices":[{{"index":0,"text":'
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"x-request-id", rid.encode()),
            (b"cache-control", b"no-cache")]})
        n = int(request["max_tokens"])
        pending: list[bytes] = []
        for i in range(n):
            finish = '"length"' if i == n - 1 else "null"
            text = chr(TEXT[i % len(TEXT)])
            event = f'{prefix}{quote(text)},"logprobs":null,"finish_reason":{finish}}}]}}\n\n'
            if joined:
                pending.append(event.encode())
            else:
                await send({"type": "http.response.body", "body": event.encode(),
                            "more_body": True})
            if (step and (i + 1) % step == 0) or i == n - 1:
                if pending:
                    await send({"type": "http.response.body", "body": b"".join(pending),
                                "more_body": True})
                    pending.clear()
                if step:
                    await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def serve_bare_sse(port: int, step: int = 0, joined: bool = False) -> None:
    import uvicorn

    config = uvicorn.Config(bare_sse_app(step, joined), host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, lifespan="on", http="httptools")
    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            print("ready", flush=True)

    Server(config).run()


def serve_bare_grpc(port: int) -> None:
    import grpc

    from servekit.protocol.grpc_gen import servekit_pb2 as pb
    from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc

    class Bare(pb_grpc.GenerationServicer):  # type: ignore[misc]
        async def GenerateStream(self, request: Any, context: Any) -> None:
            n, rid = request.max_tokens, "bare-stream"
            for i in range(n):
                token = TEXT[i % len(TEXT)]
                await context.write(pb.GenerateChunk(
                    id=rid, index=0, text=chr(token), token_ids=[token],
                    finish_reason=pb.FINISH_REASON_LENGTH if i == n - 1 else 0))
            await context.write(pb.GenerateChunk(id=rid, final=True, usage=pb.Usage(
                prompt_tokens=6, completion_tokens=n, total_tokens=6 + n)))

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(Bare(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


class PeerProcess:
    """A bare transport peer from ``_bare_peers.py`` (``sse[-stepN][-joined]`` or ``grpc``) in
    a subprocess."""

    def __init__(self, kind: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "_bare_peers.py"), kind,
             str(self.port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"bare {kind} peer did not start: {err[-2000:]}")

    def stop(self) -> None:
        stop_process(self.proc)


if __name__ == "__main__":
    kind, port_arg = sys.argv[1], int(sys.argv[2])
    if kind == "grpc":
        serve_bare_grpc(port_arg)
    else:
        options = kind.split("-")[1:]  # sse[-stepN][-joined]
        serve_bare_sse(port_arg, step=next((int(o[4:] or 1) for o in options
                                            if o.startswith("step")), 0),
                       joined="joined" in options)
