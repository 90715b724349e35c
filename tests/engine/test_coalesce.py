"""Deltas that queue up while a consumer is busy come merged, and lose nothing."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.engine.outputs import RequestOutput, TokenLogprob, merge_outputs
from servekit.sched.params import SamplingParams

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sync_engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8,
                                                    max_num_batched_tokens=128))


PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


async def test_a_consumer_that_falls_behind_gets_the_rest_merged(sync_engine: LLMEngine) -> None:
    expected = sync_engine.generate(["ROMEO: 日本"], PARAMS)[0]
    async with AsyncEngine(sync_engine) as engine:
        outs = []
        async for out in engine.generate("ROMEO: 日本", PARAMS, coalesce=True):
            outs.append(out)
            if len(outs) == 1:  # busy (a client not reading) until the request is done
                while sync_engine.has_unfinished_requests():
                    await anyio.sleep(0.01)
    assert len(outs) == 2 and len(outs[1].new_token_ids) == 11
    assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
    assert "".join(o.new_text for o in outs) == expected.text
    merged_lps = [lp for o in outs for lp in o.logprobs or []]  # one per token, in order
    assert [lp.token_id for lp in merged_lps] == expected.token_ids
    assert [len(lp.top) for lp in merged_lps] == [2] * 12
    assert outs[-1].finished and outs[-1].num_output_tokens == 12


async def test_a_consumer_that_keeps_up_gets_one_delta_per_token(sync_engine: LLMEngine) -> None:
    async with AsyncEngine(sync_engine) as engine:
        outs = [o async for o in engine.generate("ROMEO:", PARAMS, coalesce=True)]
    assert [len(o.new_token_ids) for o in outs] == [1] * 12


async def test_without_coalescing_a_late_consumer_still_gets_every_delta(
        sync_engine: LLMEngine) -> None:
    async with AsyncEngine(sync_engine) as engine:
        outs = []
        async for out in engine.generate("ROMEO:", PARAMS):
            outs.append(out)
            if len(outs) == 1:
                while sync_engine.has_unfinished_requests():
                    await anyio.sleep(0.01)
    assert [len(o.new_token_ids) for o in outs] == [1] * 12


def _delta(i: int, text: str, last: bool) -> RequestOutput:
    return RequestOutput("r", [i], text, last, "length" if last else None, 5, i + 1, 2,
                         [TokenLogprob(i, -0.1 * i)])


@given(st.lists(st.text(max_size=3), min_size=1, max_size=12), st.data())
def test_merging_any_run_of_deltas_equals_their_concatenation(texts: list[str],
                                                               data: st.DataObject) -> None:
    deltas = [_delta(i, t, i == len(texts) - 1) for i, t in enumerate(texts)]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(deltas) - 1))) if len(deltas) > 1 else [])
    runs = [deltas[a:b] for a, b in zip([0, *cuts], [*cuts, len(deltas)], strict=True)]
    merged = [merge_outputs(run) for run in runs]
    assert "".join(m.new_text for m in merged) == "".join(texts)
    assert [t for m in merged for t in m.new_token_ids] == list(range(len(texts)))
    assert [lp for m in merged for lp in m.logprobs or []] == [d.logprobs[0] for d in deltas
                                                               if d.logprobs]
    assert [m.finished for m in merged] == [False] * (len(merged) - 1) + [True]
    assert merged[-1].num_output_tokens == len(texts)
