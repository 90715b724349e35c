"""The standard health service and server reflection, through grpcio's own clients."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from servekit.server.grpc import PROTO_PATH, SERVICE_NAME

from .conftest import Served, serve

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_follows_the_server_state() -> None:
    with serve(ready=False) as served, grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert check("") == check(SERVICE_NAME) == NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert next(watch).status == NOT_SERVING
        served.service.state.set_ready()
        assert next(watch).status == SERVING
        assert check("") == check(SERVICE_NAME) == SERVING
        served.service.state.begin_drain()
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as info:
            check("no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def _reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest
             ) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))


def test_reflection_lists_and_describes_the_service(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel:
        listed = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        found = _reflect(channel, reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=SERVICE_NAME))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in found.file_descriptor_response.file_descriptor_proto]
    service = next(s for f in files for s in f.service if s.name == "Generation")
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert methods == {"Generate": (False, False), "GenerateStream": (False, True),
                       "Session": (True, True)}


def test_the_proto_ships_in_the_package() -> None:
    text = PROTO_PATH.read_text()
    assert "package servekit.v1;" in text and "rpc Session(stream SessionRequest)" in text
