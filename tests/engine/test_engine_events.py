"""The engine reports request, step, cache and KV block events to its hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from servekit.engine import EngineConfig, LLMEngine
from servekit.kv.events import BlockStored
from servekit.metrics import Hook, HookSet
from servekit.sched.params import SamplingParams


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_request_queued(self, event: Any) -> None:
        self.events.append(event)

    def on_first_token(self, event: Any) -> None:
        self.events.append(event)

    def on_request_finished(self, event: Any) -> None:
        self.events.append(event)

    def on_engine_step(self, event: Any) -> None:
        self.events.append(event)

    def on_kv_event(self, event: Any) -> None:
        self.events.append(event)


def test_a_hook_added_after_construction_sees_every_event_kind(llama_dir: Path) -> None:
    hooks = HookSet()
    engine = LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, block_size=16), hooks=hooks)
    recorder = Recorder()
    hooks.add(recorder)  # as the server does with its Prometheus hook, after the engine exists
    prompt = list(range(1, 40))  # two full blocks, so the prefix cache stores them
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, min_tokens=3))

    kinds = {type(e).__name__ for e in recorder.events}
    assert {"RequestQueued", "FirstToken", "RequestFinished", "EngineStep", "BlockStored"} <= kinds
    finished = [e for e in recorder.events if type(e).__name__ == "RequestFinished"]
    assert len(finished) == 1
    assert finished[0].prompt_tokens == len(prompt) and finished[0].output_tokens == 3
    stored = [e for e in recorder.events if isinstance(e, BlockStored)]
    assert stored[0].token_ids[:16] == tuple(prompt[:16])
