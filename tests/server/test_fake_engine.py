"""The fake model: the same deltas whatever its tokens per pass of the event loop, which sets
how often its consumer yields; configurable from the command line and the config file."""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import pytest

from servekit.engine.outputs import RequestOutput
from servekit.sched.params import SamplingParams
from servekit.server.cli import build_engine, build_parser
from servekit.server.config import apply_config
from servekit.server.fake import FakeEngine

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _deltas(engine: FakeEngine, params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in engine.generate("hi", params)]


def _key(outs: list[RequestOutput]) -> list[tuple[object, ...]]:
    return [(o.new_token_ids, o.new_text, o.finished, o.finish_reason, o.num_output_tokens,
             o.logprobs) for o in outs]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=23),
    SamplingParams(max_tokens=40, stop=["fox j", "zz"]),
    SamplingParams(max_tokens=9, logprobs=2)])
async def test_tokens_per_yield_changes_nothing_a_client_sees(params: SamplingParams) -> None:
    one = await _deltas(FakeEngine(), params)
    assert all(len(o.new_token_ids) == 1 for o in one) and one[-1].finished
    for n in (2, 7, 64):
        assert _key(await _deltas(FakeEngine(tokens_per_yield=n), params)) == _key(one)
    if params.stop:  # the stop string is matched and never emitted
        assert "".join(o.new_text for o in one) == "the quick brown " and \
            one[-1].finish_reason == "stop"


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=23),
    SamplingParams(max_tokens=40, stop=["fox j", "zz"])])
@pytest.mark.parametrize("n", [1, 7])
async def test_batched_yields_the_deltas_of_each_pass_together(params: SamplingParams,
                                                               n: int) -> None:
    one = await _deltas(FakeEngine(), params)
    engine = FakeEngine(tokens_per_yield=n)
    batches = [b async for b in engine.generate("hi", params, batched=True)]
    assert all(len(b) == n for b in batches[:-1]) and 1 <= len(batches[-1]) <= n
    assert _key([o for b in batches for o in b]) == _key(one)
    assert engine.num_used_blocks == 0


async def test_an_abort_ends_a_batched_stream_at_the_next_pass() -> None:
    engine = FakeEngine(tokens_per_yield=4)
    seen: list[list[RequestOutput]] = []
    async for batch in engine.generate("hi", SamplingParams(max_tokens=40), request_id="a",
                                       batched=True):
        seen.append(batch)
        if len(seen) == 2:
            await engine.abort("a")
    assert [len(b) for b in seen] == [4, 4, 1]
    assert seen[-1][0].finish_reason == "abort" and seen[-1][0].num_output_tokens == 8
    assert engine.num_used_blocks == 0


@pytest.mark.parametrize("n", [1, 4])
async def test_a_request_yields_to_the_loop_once_every_n_tokens(n: int,
                                                                anyio_backend: str) -> None:
    engine = FakeEngine(tokens_per_yield=n)
    order: list[str] = []

    async def consume(name: str) -> None:
        async for _ in engine.generate("hi", SamplingParams(max_tokens=12)):
            order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume, "a")
        tg.start_soon(consume, "b")
    runs = [len(list(group)) for _, group in itertools.groupby(order)]
    # the two requests take turns, n tokens at a time (trio may run one twice in a row)
    assert sum(runs) == 24 and len(runs) >= 3 and all(r % n == 0 for r in runs)
    if anyio_backend == "asyncio":  # FIFO: strictly alternating
        assert set(runs) == {n}


def test_tokens_per_yield_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tokens_per_yield"):
        FakeEngine(tokens_per_yield=0)


def test_the_flag_and_the_file_set_it(tmp_path: Path) -> None:
    def engine(*argv: str) -> FakeEngine:
        built = build_engine(apply_config(build_parser().parse_args(["serve", "--fake", *argv])))
        assert isinstance(built, FakeEngine)
        return built

    assert engine().tokens_per_yield == 1
    assert engine("--fake-tokens-per-yield", "16").tokens_per_yield == 16
    path = tmp_path / "servekit.toml"
    path.write_text("[engine]\nfake_tokens_per_yield = 8\n")
    assert engine("--config", str(path)).tokens_per_yield == 8
