"""The replica proxy (no cluster): a replica's own error comes back as itself, Ray's
back-pressure is a 503 with retry-after, and a replica that dies mid-stream is failed over (the
request resumed elsewhere after the tokens already yielded), a bounded number of times."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from ray.exceptions import (  # noqa: E402
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    RayTaskError,
)
from ray.serve.exceptions import BackPressureError  # noqa: E402

from servekit.deploy.ray.proxy import ReplicaEngine, _unwrap, failover_reason  # noqa: E402
from servekit.engine.outputs import RequestOutput  # noqa: E402
from servekit.protocol.errors import ServiceUnavailableError  # noqa: E402
from servekit.sched.errors import QueueFullError  # noqa: E402
from servekit.sched.params import SamplingParams  # noqa: E402
from servekit.server.fake import FakeEngine  # noqa: E402


def test_a_replicas_error_comes_back_as_itself() -> None:
    cause = QueueFullError("max_waiting_requests", "8 requests already wait", retry_after=2.0)
    wrapped = RayTaskError("generate", "Traceback ...", cause)
    assert _unwrap(wrapped) is cause
    assert _unwrap(wrapped.as_instanceof_cause()) is cause


def test_a_dead_replica_is_a_503() -> None:
    err = _unwrap(ActorDiedError())
    assert isinstance(err, ServiceUnavailableError)
    assert err.status == 503 and err.headers["retry-after"] == "1"
    assert b"replica_failed" in err.body()


def test_back_pressure_is_a_503() -> None:
    err = _unwrap(BackPressureError(num_queued_requests=5, max_queued_requests=5))
    assert isinstance(err, ServiceUnavailableError) and err.status == 503


def test_anything_else_passes_through() -> None:
    exc = ValueError("x")
    assert _unwrap(exc) is exc


# --- failover of in-flight streams (a scripted handle: no cluster) ---------------------------


class ScriptedReplicas:
    """A stand-in for ``handle.options(stream=True)``: each call streams a fake engine's deltas
    (tokens by position, so a resume continues them) and the ``n``-th call dies after
    ``die_after[n]`` deltas with ``error``."""

    def __init__(self, die_after: list[int | None], error: Exception | None = None) -> None:
        self.engine = FakeEngine()
        self.die_after = die_after
        self.error = error if error is not None else ActorDiedError()
        self.calls: list[list[int]] = []
        self.cancelled = 0
        self.generate = self

    def options(self, **kwargs: object) -> ScriptedReplicas:
        return self

    def remote(self, prompt: list[int], params: SamplingParams, *, request_id: str,
               output_token_ids: list[int], **kwargs: object) -> _Call:
        n = len(self.calls)
        self.calls.append(output_token_ids)
        limit = self.die_after[n] if n < len(self.die_after) else None
        return _Call(self, self.engine.generate(prompt, params, request_id=f"{request_id}-{n}",
                                                output_token_ids=output_token_ids), limit)


class _Call:
    def __init__(self, owner: ScriptedReplicas, stream: object, limit: int | None) -> None:
        self.owner, self.stream, self.limit = owner, stream, limit

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.limit is not None:
            if self.limit == 0:
                raise self.owner.error
            self.limit -= 1
        return await self.stream.__anext__()  # type: ignore[attr-defined,no-any-return]

    def cancel(self) -> None:
        self.owner.cancelled += 1


INFO = {"tokenizer": None, "model_name": "fake", "max_model_len": 4096}


async def collect(engine: ReplicaEngine, max_tokens: int = 30) -> list[RequestOutput]:
    return [out async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens),
                                                 request_id="r")]


def test_a_dead_replica_is_resumed_after_the_tokens_already_yielded() -> None:
    replicas = ScriptedReplicas([7, 5])  # dies after 7 deltas, then its successor after 5
    engine = ReplicaEngine(replicas, INFO)
    outs = anyio.run(collect, engine)
    baseline = anyio.run(collect, ReplicaEngine(ScriptedReplicas([]), INFO))
    assert [t for o in outs for t in o.new_token_ids] == \
        [t for o in baseline for t in o.new_token_ids]
    assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in baseline)
    assert outs[-1].finished and outs[-1].num_output_tokens == 30
    assert [len(c) for c in replicas.calls] == [0, 7, 12]  # each resume after what was yielded
    assert replicas.calls[2] == [t for o in baseline for t in o.new_token_ids][:12]
    assert engine.num_failovers == 2 and engine.num_live_requests == 0
    assert engine.failovers == {"actor_died": 2}
    assert replicas.engine.num_used_blocks == 0


def test_failovers_count_by_how_ray_reported_the_loss() -> None:
    assert failover_reason(ActorDiedError()) == "actor_died"
    assert failover_reason(ActorUnavailableError("restarting", None)) == "actor_unavailable"
    assert failover_reason(RayActorError()) == "actor_error"
    assert failover_reason(RayTaskError("generate", "tb", ActorDiedError())) == "actor_died"
    engine = ReplicaEngine(ScriptedReplicas([4], ActorUnavailableError("restarting", None)),
                           INFO)
    assert anyio.run(collect, engine)[-1].num_output_tokens == 30
    assert engine.failovers == {"actor_unavailable": 1}


def test_failovers_are_bounded() -> None:
    replicas = ScriptedReplicas([2, 2, 2, 2, 2])
    engine = ReplicaEngine(replicas, INFO, max_failovers=3)
    with pytest.raises(ServiceUnavailableError) as err:
        anyio.run(collect, engine)
    assert b"replica_failed" in err.value.body()
    assert len(replicas.calls) == 4 and engine.num_live_requests == 0


@pytest.mark.parametrize("error", [QueueFullError("max_waiting_requests", "full", retry_after=1.0),
                                   ValueError("x")])
def test_the_requests_own_errors_are_not_failed_over(error: Exception) -> None:
    replicas = ScriptedReplicas([3], RayTaskError("generate", "tb", error))
    with pytest.raises(type(error)):
        anyio.run(collect, ReplicaEngine(replicas, INFO))
    assert len(replicas.calls) == 1


def test_an_aborted_request_is_not_resumed() -> None:
    class Cancelled(Exception):
        pass

    replicas = ScriptedReplicas([4], Cancelled())
    engine = ReplicaEngine(replicas, INFO)

    async def run() -> None:
        stream = engine.generate([1, 2], SamplingParams(max_tokens=20), request_id="r")
        await stream.__anext__()
        await engine.abort("r")  # the client left: the call is cancelled, then fails
        with pytest.raises(Cancelled):
            async for _ in stream:
                pass

    anyio.run(run)
    assert len(replicas.calls) == 1 and replicas.cancelled >= 1
    assert engine.num_live_requests == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=5), st.integers(1, 40))
def test_any_failures_up_to_the_bound_leave_the_stream_whole(deaths: list[int],
                                                              max_tokens: int) -> None:
    """Whatever the schedule of replica deaths: within the bound the tokens, text and counts
    are the uninterrupted run's; past it, a 503 and nothing left open."""
    baseline = anyio.run(collect, ReplicaEngine(ScriptedReplicas([]), INFO), max_tokens)
    # a death after the stream's last delta never happens: that call finishes first
    replicas = ScriptedReplicas(list(deaths))
    engine = ReplicaEngine(replicas, INFO)
    calls_needed, sent = 0, 0
    for d in deaths:
        if sent + d >= max_tokens:
            break
        calls_needed, sent = calls_needed + 1, sent + d
    if calls_needed > engine.max_failovers:
        with pytest.raises(ServiceUnavailableError):
            anyio.run(collect, engine, max_tokens)
    else:
        outs = anyio.run(collect, engine, max_tokens)
        assert [t for o in outs for t in o.new_token_ids] == \
            [t for o in baseline for t in o.new_token_ids]
        assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in baseline)
        assert outs[-1].num_output_tokens == max_tokens and outs[-1].finish_reason == "length"
        assert engine.num_failovers == calls_needed
    assert engine.num_live_requests == 0 and replicas.engine.num_used_blocks == 0
