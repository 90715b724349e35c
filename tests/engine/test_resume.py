"""Resuming a generation from the output tokens a cut-short run already produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servekit.engine import EngineConfig, LLMEngine
from servekit.engine.outputs import RequestOutput
from servekit.sched.params import InvalidParameterError, SamplingParams

N = 16
GREEDY = SamplingParams(temperature=0, max_tokens=N, min_tokens=N)
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=N, min_tokens=N)
PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, block_size=4))


def run(engine: LLMEngine, params: SamplingParams, outputs: list[int] | None = None,
        prompt: str = PROMPT) -> list[RequestOutput]:
    """Every delta of one request, run alone to the end."""
    rid = engine.add_request(prompt, params, output_token_ids=outputs or ())
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o for o in engine.step() if o.request_id == rid]
    assert deltas[-1].finished
    return deltas


def ids_of(deltas: list[RequestOutput]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def text_of(deltas: list[RequestOutput]) -> str:
    return "".join(d.new_text for d in deltas)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 5, 11, N - 1])
def test_resume_continues_the_uninterrupted_run(engine: LLMEngine, params: SamplingParams,
                                                k: int) -> None:
    full = run(engine, params)
    ids = ids_of(full)
    assert len(ids) == N and len(full) == N  # one delta per token
    resumed = run(engine, params, ids[:k])
    assert ids_of(resumed) == ids[k:]
    # the text the first k deltas sent, joined with the resumed text, is the whole text
    assert text_of(full[:k]) + text_of(resumed) == text_of(full)
    last = resumed[-1]
    assert (last.finish_reason, last.num_output_tokens) == ("length", N)
    assert last.num_prompt_tokens == full[-1].num_prompt_tokens


def test_seeded_draws_depend_on_position_not_on_the_run(engine: LLMEngine) -> None:
    a = ids_of(run(engine, SEEDED))
    b = ids_of(run(engine, SEEDED))
    other = ids_of(run(engine, SamplingParams(temperature=1.0, seed=99, max_tokens=N,
                                              min_tokens=N)))
    assert a == b
    assert a != other


def test_a_stop_string_spanning_the_resume_point_is_honoured(engine: LLMEngine) -> None:
    full = run(engine, GREEDY)
    text = text_of(full)
    # a stop string made of the text just before token k and just after it
    for k in range(3, N - 2):
        before, after = text_of(full[:k]), text_of(full[k:])
        if len(before) >= 2 and len(after) >= 2:
            stop = before[-2:] + after[:2]
            if text.find(stop) == len(before) - 2:
                break
    else:
        pytest.fail("no token boundary in the seeded model's output makes a stop string")
    params = SamplingParams(temperature=0, max_tokens=N, min_tokens=N, stop=[stop])
    stopped = run(engine, params)
    assert text_of(stopped) == text[: len(before) - 2]
    assert stopped[-1].finish_reason == "stop"
    ids = ids_of(full)
    resumed = run(engine, params, ids[:k])  # the cut came while the stop's start was held back
    assert text_of(stopped[:k]) + text_of(resumed) == text[: len(before) - 2]
    assert resumed[-1].finish_reason == "stop"
    # outputs that already hold the whole stop string cannot be resumed
    with pytest.raises(InvalidParameterError) as err:
        run(engine, params, ids[: k + 2])
    assert err.value.param == "output_token_ids"


def test_max_tokens_counts_the_resumed_tokens(engine: LLMEngine) -> None:
    ids = ids_of(run(engine, GREEDY))
    params = SamplingParams(temperature=0, max_tokens=8)
    resumed = run(engine, params, ids[:5])
    assert ids_of(resumed) == ids[5:8]
    assert (resumed[-1].finish_reason, resumed[-1].num_output_tokens) == ("length", 8)
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request(PROMPT, params, output_token_ids=ids[:8])
    assert err.value.param == "output_token_ids"
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request(PROMPT, params, output_token_ids=[engine.vocab_size])
    assert err.value.param == "output_token_ids"
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_penalties_see_the_resumed_tokens(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=N, min_tokens=N, frequency_penalty=1.5,
                            repetition_penalty=1.3)
    full = run(engine, params)
    ids = ids_of(full)
    resumed = run(engine, params, ids[:6])
    assert ids_of(resumed) == ids[6:]


def test_async_engine_resumes(llama_dir: Path) -> None:
    import anyio

    from servekit.engine import AsyncEngine

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncEngine(LLMEngine(llama_dir, config=EngineConfig(num_blocks=64,
                                                                         block_size=4))) as eng:
            full: list[Any] = [o async for o in eng.generate(PROMPT, GREEDY)]
            ids = ids_of(full)
            resumed = [o async for o in eng.generate(PROMPT, GREEDY, output_token_ids=ids[:4])]
            return ids[4:], ids_of(resumed)

    expected, got = anyio.run(main)
    assert got == expected
