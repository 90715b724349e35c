"""AsyncEngine on asyncio and trio: streaming, cancellation, aborts, errors, responsiveness."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.sched.errors import QueueFullError
from servekit.sched.params import SamplingParams

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sync_engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(llama_dir, config=EngineConfig(num_blocks=160, block_size=4, max_num_seqs=48,
                                                    max_num_batched_tokens=256))


async def test_stream_deltas_concatenate_to_the_sync_result(sync_engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = sync_engine.generate(["ROMEO: 日本"], params)[0]
    async with AsyncEngine(sync_engine) as engine:
        outs = [o async for o in engine.generate("ROMEO: 日本", params)]
    assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
    assert "".join(o.new_text for o in outs) == expected.text
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert outs[-1].num_output_tokens == 10 and outs[-1].num_prompt_tokens > 0


async def test_many_concurrent_generations_with_cancellations_free_every_block(
    sync_engine: LLMEngine,
) -> None:
    rng = random.Random(0)
    finished: list[str] = []
    cancelled = 0

    async def one(i: int) -> None:
        nonlocal cancelled
        prompt = [rng.randrange(1, 300) for _ in range(rng.randrange(2, 24))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(2, 12),
                                ignore_eos=True)
        mode = rng.randrange(3)
        with anyio.move_on_after(rng.uniform(0.0, 0.3) if mode == 0 else 60) as scope:
            async for out in engine.generate(prompt, params):
                if mode == 1 and out.num_output_tokens >= 2:
                    break  # leaving the iteration aborts
                if out.finished:
                    finished.append(out.finish_reason or "")
        cancelled += scope.cancelled_caught

    async with AsyncEngine(sync_engine) as engine, anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert cancelled > 0 and len(finished) > 0
    assert sync_engine.kv.usage == 0
    assert sync_engine.kv.num_free_blocks == sync_engine.kv.num_blocks
    assert not sync_engine.has_unfinished_requests()


async def test_event_loop_stays_responsive_during_steps(sync_engine: LLMEngine) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async with AsyncEngine(sync_engine) as engine, anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        outs = [o async for o in engine.generate(list(range(1, 60)), params)]
        tg.cancel_scope.cancel()
    assert outs[-1].num_output_tokens == 30 and ticks >= 10


async def test_abort_by_id_ends_the_stream(sync_engine: LLMEngine) -> None:
    async with AsyncEngine(sync_engine) as engine:
        outs = []
        async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True),
                                         request_id="victim"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("victim")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert sync_engine.kv.usage == 0


async def test_queue_full_propagates_to_the_caller(llama_dir: Path) -> None:
    sync = LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, max_waiting_requests=1,
                                                        max_num_seqs=1))
    async with AsyncEngine(sync) as engine:
        params = SamplingParams(max_tokens=3)
        streams = [engine.generate([1, 2, 3], params) for _ in range(3)]
        await streams[0].__anext__()
        sync.add_request([4, 5, 6], params)  # fills the one waiting slot
        with pytest.raises(QueueFullError):
            await streams[1].__anext__()
        for s in streams:
            await s.aclose()


async def test_chat_uses_the_chat_template(sync_engine: LLMEngine, tokenizer: Any) -> None:
    async with AsyncEngine(sync_engine) as engine:
        msgs = [{"role": "user", "content": "hello"}]
        outs = [o async for o in engine.chat(msgs, SamplingParams(temperature=0, max_tokens=4))]
    ids = tokenizer.encode("<|user|>hello\n<|assistant|>")
    assert outs[-1].num_prompt_tokens == len(ids) and outs[-1].finished


async def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(
    sync_engine: LLMEngine,
) -> None:
    runner = sync_engine.runner
    real = runner.execute
    calls = 0

    def flaky(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return real(batch)

    runner.execute = flaky  # type: ignore[method-assign]
    try:
        async with AsyncEngine(sync_engine) as engine:
            params = SamplingParams(max_tokens=3, ignore_eos=True)  # sampled: eos must not end it
            first = [o async for o in engine.generate([1, 2, 3], params)]
            second = [o async for o in engine.generate([1, 2, 3], params)]
    finally:
        del runner.execute
    assert first[-1].finish_reason == "error" and "boom" in (first[-1].error or "")
    assert second[-1].finish_reason == "length"
    assert sync_engine.kv.usage == 0


async def test_async_engine_builds_its_engine_from_a_path(llama_dir: Path) -> None:
    config = EngineConfig(num_blocks=32, block_size=4)
    async with AsyncEngine(llama_dir, config=config) as engine:
        assert engine.model_name == llama_dir.name and engine.max_model_len == 512
        outs = [o async for o in engine.generate("hi", SamplingParams(max_tokens=2))]
    assert outs[-1].finished and engine.engine.kv.usage == 0
    with pytest.raises(TypeError):
        AsyncEngine(engine.engine, config=config)
