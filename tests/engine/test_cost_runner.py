"""The cost-model runner: the real engine over a fake model whose steps cost what a model's
would (deterministic tokens; step time grows with uncached prompt tokens)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.engine import EngineConfig, LLMEngine, Runner
from servekit.engine.cost_runner import TEXT, CostModelRunner
from servekit.sched import InvalidParameterError, SamplingParams
from servekit.server.fake import FakeTokenizer


def _engine() -> tuple[LLMEngine, CostModelRunner, list[float]]:
    slept: list[float] = []
    runner = CostModelRunner(base_s=0.001, prefill_token_s=1e-4, decode_row_s=1e-3,
                             num_blocks=64, sleep=slept.append)
    assert isinstance(runner, Runner)
    engine = LLMEngine(runner, config=EngineConfig(block_size=16, max_num_batched_tokens=512),
                       tokenizer=FakeTokenizer())
    return engine, runner, slept


def _expected(prompt_len: int, n: int) -> bytes:
    """The runner's tokens: the byte of TEXT at each output's position."""
    return bytes(TEXT[(prompt_len + i) % len(TEXT)] for i in range(n))


@settings(max_examples=25, deadline=None)
@given(prompt=st.text(min_size=1, max_size=60), n=st.integers(1, 20),
       temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.none() | st.integers(0, 9))
def test_tokens_are_a_function_of_position(prompt: str, n: int, temperature: float,
                                           seed: int | None) -> None:
    engine, _, _ = _engine()
    ids = FakeTokenizer().encode(prompt)
    [result] = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=temperature,
                                                        seed=seed))
    assert bytes(result.token_ids) == _expected(len(ids), n)  # whatever the sampling settings
    assert result.finish_reason == "length"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_step_time_grows_with_uncached_prompt_tokens() -> None:
    engine, runner, slept = _engine()
    short, long = "x" * 100, "y" * 400
    engine.generate([short], SamplingParams(max_tokens=1, temperature=0))
    first_short = slept[-1]
    engine.generate([long], SamplingParams(max_tokens=1, temperature=0))
    first_long = slept[-1]
    # one prefill step each: base + the prompt's tokens (the bos included)
    assert first_short == pytest.approx(0.001 + 1e-4 * 101)
    assert first_long == pytest.approx(0.001 + 1e-4 * 401)
    # the long prompt again: its 25 full blocks (400 tokens) are cached, one token is computed
    [again] = engine.generate([long], SamplingParams(max_tokens=1, temperature=0))
    assert again.num_cached_tokens == 400
    assert slept[-1] == pytest.approx(0.001 + 1e-3)  # one row of one token: a decode row
    assert runner.prefill_tokens == 101 + 401
    assert runner.busy_s == pytest.approx(sum(slept))


def test_decode_rows_cost_per_row() -> None:
    engine, _, slept = _engine()
    engine.generate(["a" * 20, "b" * 30, "c" * 40], SamplingParams(max_tokens=4, temperature=0))
    # first step prefills all three (21 + 31 + 41 tokens), then three steps of three decode rows
    assert slept[0] == pytest.approx(0.001 + 1e-4 * 93)
    assert slept[1:] == pytest.approx([0.001 + 3e-3] * 3)


def test_sized_from_a_byte_budget_and_checked() -> None:
    assert CostModelRunner(kv_cache_bytes=2**20, block_bytes=2**14).num_blocks == 64
    with pytest.raises(InvalidParameterError, match="prefill_token_s"):
        CostModelRunner(prefill_token_s=-1)
    with pytest.raises(InvalidParameterError, match="num_blocks"):
        CostModelRunner(num_blocks=0)
    with pytest.raises(InvalidParameterError, match="vocab_size"):
        CostModelRunner(vocab_size=100)
