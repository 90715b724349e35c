"""The replica's ``generate`` (no cluster: the deployment's class on a fake engine): deltas that
arrive back to back are merged into few items, a slow engine's are not held back, the engine's
errors come through, and leaving early frees the request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from servekit.deploy.ray.replica import EngineReplica  # noqa: E402
from servekit.engine.outputs import RequestOutput  # noqa: E402
from servekit.sched.errors import QueueFullError  # noqa: E402
from servekit.sched.params import SamplingParams  # noqa: E402
from servekit.server.fake import FakeEngine  # noqa: E402


class _Replica:
    """The deployment's ``generate`` over ``engine``, without Ray (nor its async __del__)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self._coalesce, self.requests = engine, False, 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return EngineReplica.func_or_class.generate(self, *args, **kwargs)  # type: ignore[attr-defined]


def replica(engine: FakeEngine) -> Any:
    return _Replica(engine)


async def collect(engine: FakeEngine, max_tokens: int, **kwargs: Any) -> list[RequestOutput]:
    return [out async for out in replica(engine).generate(
        [1, 2, 3], SamplingParams(max_tokens=max_tokens), request_id="r", **kwargs)]


def test_back_to_back_deltas_travel_merged() -> None:
    outs = asyncio.run(collect(FakeEngine(), 400))
    alone = asyncio.run(collect(FakeEngine(), 400))
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == 400 and tokens == [t for o in alone for t in o.new_token_ids]
    assert len(outs) < 400 / 4  # an instant engine's tokens share items
    assert outs[-1].finished and outs[-1].num_output_tokens == 400
    assert "".join(o.new_text for o in outs).startswith("the quick brown fox")


def test_a_paced_engines_deltas_go_one_by_one() -> None:
    outs = asyncio.run(collect(FakeEngine(token_delay=0.005), 10))
    assert [len(o.new_token_ids) for o in outs] == [1] * 10


def test_a_resume_continues_after_the_given_tokens() -> None:
    full = asyncio.run(collect(FakeEngine(), 40))
    ids = [t for o in full for t in o.new_token_ids]
    rest = asyncio.run(collect(FakeEngine(), 40, output_token_ids=ids[:15]))
    assert [t for o in rest for t in o.new_token_ids] == ids[15:]
    assert rest[-1].num_output_tokens == 40


def test_the_engines_errors_come_through() -> None:
    engine = FakeEngine(max_running=1, max_waiting=0)

    async def run() -> None:
        first = replica(engine).generate([1], SamplingParams(max_tokens=10**4), request_id="a")
        await first.__anext__()
        with pytest.raises(QueueFullError):
            await collect(engine, 5)
        await first.aclose()

    asyncio.run(run())
    assert engine.num_used_blocks == 0 and engine.num_live_requests == 0


def test_leaving_early_frees_the_request() -> None:
    engine = FakeEngine(token_delay=0.001)

    async def run() -> None:
        stream = replica(engine).generate([1, 2], SamplingParams(max_tokens=10**4),
                                          request_id="r")
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    assert engine.num_used_blocks == 0 and engine.num_live_requests == 0
