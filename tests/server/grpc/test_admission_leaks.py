"""An admitted gRPC call settles its rate-limit reservation however it ends, also when it
ends between its admission and its run: the call cancelled (the client gone, its deadline
passed) or failing while its initial metadata (the rate-limit headers) is being sent.

The servicer is driven directly, with a context whose ``send_initial_metadata`` parks (the
test cancels the call there) or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest

from servekit.limit import ApiKey, KeyLimits, KeyStore
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.server.fake import FakeEngine
from servekit.server.grpc.service import GenerationServicer
from servekit.server.service import GenerationService


class _Aborted(Exception):
    """What grpc.aio's ``context.abort`` raises."""


class _Context:
    """The ServicerContext of one call by a key with a token limit."""

    def __init__(self, metadata: str) -> None:
        self.metadata = metadata
        self.parked = asyncio.Event()
        self.aborted: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer sk-t"),)

    async def send_initial_metadata(self, metadata: Any) -> None:
        if self.metadata == "fails":
            raise RuntimeError("the call is already over")
        self.parked.set()
        await asyncio.Event().wait()  # until cancelled

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self.aborted = code
        raise _Aborted(details)

    async def write(self, message: Any) -> None:
        pass


async def _call(method: str, metadata: str) -> None:
    engine = FakeEngine()
    limits = KeyLimits()
    service = GenerationService(engine, keys=KeyStore([ApiKey("sk-t", tpm=100_000)]),
                                limits=limits)
    async with engine:
        service.state.set_ready()
        context = _Context(metadata)
        request = pb.GenerateRequest(model="fake", prompt="hello", max_tokens=4)
        call = asyncio.ensure_future(getattr(GenerationServicer(service), method)(
            request, context))
        parked = asyncio.ensure_future(context.parked.wait())
        await asyncio.wait({call, parked}, return_when=asyncio.FIRST_COMPLETED)
        parked.cancel()
        if metadata == "parks":
            assert not call.done()
            call.cancel()  # the client went away while the headers were being sent
        with contextlib.suppress(asyncio.CancelledError, _Aborted, RuntimeError):
            await call
        assert limits.open_reservations == 0


@pytest.mark.parametrize("metadata", ["parks", "fails"])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_call_ended_before_its_run_settles_its_reservation(method: str, metadata: str) -> None:
    asyncio.run(_call(method, metadata))
