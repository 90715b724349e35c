"""gRPC beside HTTP on one GenerationService: what ``servekit serve --grpc-port`` runs."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servekit.client import OverloadedError, RetryPolicy
from servekit.client.grpc import GrpcClient
from servekit.server.app import ServerConfig, create_app
from servekit.server.fake import FakeEngine
from servekit.server.grpc import serve_beside
from tests.asgi_server import free_port


def test_one_engine_one_drain() -> None:
    engine = FakeEngine()
    app = create_app(engine, metrics=False, config=ServerConfig(grace_period=1))
    service = app.state.servekit
    http_port, grpc_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=asyncio.run, daemon=True, args=(serve_beside(
        server, service, host="127.0.0.1", port=grpc_port, grace_period=1),))
    thread.start()
    url, address = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 20
    while not service.state.ready:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    with GrpcClient(address, retry=RetryPolicy(0)) as client:
        assert client.complete("fake", "x", max_tokens=3).text == "the"
        body = {"model": "fake", "prompt": "x", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == "th"
        assert engine.num_requests == 2  # both front ends drove the same engine
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            service.state.begin_drain()  # what SIGTERM does first
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(OverloadedError, match="draining"):
            client.complete("fake", "x", max_tokens=3)
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive()
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=0.5)  # the gRPC port is closed
