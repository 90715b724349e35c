"""Unary, server-streaming and bidirectional calls against a real grpc.aio server (fake engine)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.client.grpc import AsyncGrpcClient, GrpcClient
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.protocol.grpc_gen import servekit_pb2_grpc as pb_grpc
from servekit.server.fake import FakeEngine

from .conftest import Served, serve

TEXT = "the quick brown fox jumps over the lazy dog "
CHAT = [{"role": "user", "content": "hi"}]


def test_unary_completion_and_chat(served: Served) -> None:
    with GrpcClient(served.address) as client:
        done = client.complete("fake", "hello", max_tokens=7)
        chat = client.chat("fake", CHAT, max_tokens=3, n=2)
    assert done.text == TEXT[:7]
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 7
    assert done.usage.prompt_tokens == len("hello") + 1  # the fake's bos
    assert [c.message.content for c in chat.choices] == [TEXT[:3]] * 2
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    served.wait_idle()


def test_stream_matches_unary_and_ends_with_usage(served: Served) -> None:
    with GrpcClient(served.address) as client:
        chunks = list(client.stream_complete("fake", [1, 2, 3], max_tokens=5, stop="fox"))
        chat = list(client.stream_chat("fake", CHAT, max_tokens=4))
        whole = client.complete("fake", [1, 2, 3], max_tokens=5, stop="fox")
    assert "".join(c.text for c in chunks) == whole.text == TEXT[:5]
    assert chunks[-1].choices == () and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chat[0].choices[0].message.role == "assistant" and chat[0].model == "fake"
    assert "".join(c.text for c in chat) == TEXT[:4]
    served.wait_idle()


def test_stop_string_and_logprobs(served: Served) -> None:
    with GrpcClient(served.address) as client:
        out = client.complete("fake", "x", max_tokens=30, stop=["brown"], logprobs=2)
    choice = out.choices[0]
    assert choice.text == "the quick " and choice.finish_reason == "stop"
    assert choice.logprobs is not None and len(choice.logprobs["top_logprobs"][0]) == 2


def test_async_client_same_shapes(served: Served) -> None:
    async def run() -> tuple[Any, ...]:
        async with AsyncGrpcClient(served.address) as client:
            done = await client.complete("fake", "hello", max_tokens=6)
            chunks = [c async for c in client.stream_chat("fake", CHAT, max_tokens=3)]
            async with client.session() as session:
                a = await session.complete("fake", "a", max_tokens=4)
                b = await session.chat("fake", CHAT, max_tokens=2)
                got_b, got_a = await b.result(), await a.result()
        return done, chunks, got_a, got_b

    done, chunks, got_a, got_b = served.run(run())
    assert done.text == TEXT[:6]
    assert "".join(c.text for c in chunks) == TEXT[:3]
    assert got_a.text == TEXT[:4] and got_b.text == TEXT[:2]
    assert got_a.usage is not None and got_a.usage.completion_tokens == 4
    served.wait_idle()


# -- bidirectional -------------------------------------------------------------------------

def _gen(rid: str, max_tokens: int) -> Any:
    return pb.SessionRequest(generate=pb.GenerateRequest(request_id=rid, model="fake",
                                                         prompt="hi", max_tokens=max_tokens))


async def _session(address: str, script: list[Any], cancel_after: dict[str, int]
                   ) -> list[Any]:
    """Send ``script``; cancel request r after it produced ``cancel_after[r]`` chunks."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GenerationStub(channel).Session()
        for message in script:
            await call.write(message)
        await call.done_writing()
        seen: dict[str, int] = {}
        responses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
            rid = response.request_id
            seen[rid] = seen.get(rid, 0) + 1
            if seen[rid] == cancel_after.get(rid):
                await call.write(pb.SessionRequest(cancel=pb.Cancel(request_id=rid)))
        return responses


def test_bidi_interleaves_and_cancels_one() -> None:
    # done_writing() before the cancel would half-close the stream; keep it open instead
    with serve(FakeEngine(token_delay=0.002)) as served:
        async def run() -> list[Any]:
            async with grpc.aio.insecure_channel(served.address) as channel:
                call = pb_grpc.GenerationStub(channel).Session()
                for rid in ("a", "b", "c"):
                    await call.write(_gen(rid, 40))
                responses, seen, finals = [], {"b": 0}, set()
                while len(finals) < 3:
                    response = await call.read()
                    responses.append(response)
                    if response.request_id == "b" and not response.final:
                        seen["b"] += 1
                        if seen["b"] == 5:
                            await call.write(pb.SessionRequest(cancel=pb.Cancel(request_id="b")))
                    if response.final:
                        finals.add(response.request_id)
                # the stream is still open after the cancel: one more request runs on it
                await call.write(_gen("d", 3))
                await call.done_writing()
                while (response := await call.read()) is not grpc.aio.EOF:
                    responses.append(response)
                assert await call.code() == grpc.StatusCode.OK
                return responses

        responses = served.run(run())
        served.wait_idle()
    by_id: dict[str, list[Any]] = {}
    for r in responses:
        by_id.setdefault(r.request_id, []).append(r)
    order = [r.request_id for r in responses if r.request_id in "abc"]
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches > 10, "requests on one session must interleave"
    for rid, n in (("a", 40), ("c", 40), ("d", 3)):
        text = "".join(r.chunk.text for r in by_id[rid])
        assert text == (TEXT * 2)[:n]
        assert by_id[rid][-1].final and by_id[rid][-1].chunk.usage.completion_tokens == n
        assert [r.final for r in by_id[rid]].count(True) == 1
    b = by_id["b"]
    assert b[-1].final and b[-2].chunk.finish_reason == pb.FINISH_REASON_ABORT
    got = b[-1].chunk.usage.completion_tokens
    assert 5 <= got < 40 and got == sum(len(r.chunk.token_ids) for r in b)


def test_bidi_bad_request_fails_alone() -> None:
    script = [_gen("ok", 3), _gen("ok", 2), _gen("bad", -1), _gen("", 2)]
    # A token delay keeps the first "ok" open while its duplicate arrives (an instant engine
    # could finish it first, and then the duplicate would be a valid new request).
    with serve(FakeEngine(token_delay=0.05)) as served:
        responses = served.run(_session(served.address, script, {}))
        served.wait_idle()
    errors = {r.request_id: r.error for r in responses if r.WhichOneof("kind") == "error"}
    assert set(errors) == {"ok", "bad", ""}
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in errors.values())
    assert "already open" in errors["ok"].message and "max_tokens" in errors["bad"].message
    ok = [r for r in responses if r.request_id == "ok" and r.WhichOneof("kind") == "chunk"]
    assert "".join(r.chunk.text for r in ok) == TEXT[:3]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.one_of(st.none(), st.integers(1, 30))),
                min_size=1, max_size=6))
def test_session_invariants(plan: list[tuple[int, int | None]]) -> None:
    """Every request gets exactly one final response; uncancelled ones all their tokens; the
    usage counts what was sent; nothing is held afterwards."""
    with serve(FakeEngine(token_delay=0.0005)) as served:
        with GrpcClient(served.address) as client, client.session() as session:
            calls = [(session.complete("fake", "p", max_tokens=n), n, c) for n, c in plan]
            for call, n, cancel_after in calls:
                chunks = []
                for chunk in call:
                    chunks.append(chunk)
                    if len(chunks) == cancel_after:
                        call.cancel()
                usage = chunks[-1].usage
                assert usage is not None and call.done
                text = "".join(c.text for c in chunks)
                assert usage.completion_tokens == len(text)
                reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
                assert reasons[-1] in ("length", "abort")
                if cancel_after is None or cancel_after >= n:
                    assert text == (TEXT * 2)[:n] and reasons[-1] == "length"
        served.wait_idle()


# -- cancellation --------------------------------------------------------------------------

def test_abandoned_stream_aborts_and_frees() -> None:
    engine = FakeEngine(token_delay=0.01)
    with serve(engine) as served, GrpcClient(served.address) as client:
        stream = client.stream_complete("fake", "hello " * 40, max_tokens=1000)
        next(stream), next(stream)
        assert engine.num_used_blocks > 0
        stream.close()  # cancels the call
        served.wait_idle()


def test_deadline_aborts_unary() -> None:
    from servekit.client import APITimeoutError, RetryPolicy, Timeout

    with serve(FakeEngine(token_delay=0.01)) as served:
        client = GrpcClient(served.address, timeout=Timeout(read=0.2), retry=RetryPolicy(0))
        start = time.monotonic()
        with pytest.raises(APITimeoutError):
            client.complete("fake", "hello", max_tokens=1000)
        assert time.monotonic() - start < 2
        client.close()
        served.wait_idle()
