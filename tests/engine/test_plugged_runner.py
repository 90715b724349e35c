"""A model runner that is not a transformers model, plugged into LLMEngine through the Runner
interface, and the engine's scheduling policy given as a spec or an instance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from servekit.engine import EngineConfig, LLMEngine, Runner
from servekit.engine.batch import PackedBatch
from servekit.sched import FairSharePolicy, InvalidParameterError, PriorityPolicy, SamplingParams

VOCAB = 50
EOS = 0


def next_token(context: Sequence[int]) -> int:
    """The toy model: the next token is a function of the whole context (never EOS)."""
    return 1 + (sum((i + 1) * t for i, t in enumerate(context)) % (VOCAB - 1))


class SlotRunner:
    """Keeps each token in its KV slot and reads the context back through the block table, so
    a wrong slot mapping or block table changes the output."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4) -> None:
        self.device = torch.device("cpu")
        self.vocab_size = VOCAB
        self.num_blocks = num_blocks
        self.max_model_len = 128
        self.eos_token_ids = frozenset({EOS})
        self.block_size = block_size
        self.slots = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.steps = 0

    def execute(self, batch: PackedBatch) -> torch.Tensor:
        self.steps += 1
        valid = batch.slot_mapping >= 0
        self.slots[batch.slot_mapping[valid]] = batch.input_ids[valid]
        rows = []
        starts = batch.query_start_loc
        for i in range(len(starts) - 1):
            last = starts[i + 1] - 1
            if last not in set(batch.logits_indices.tolist()):
                continue
            length = int(batch.seq_lens[i])
            table = batch.block_tables[i]
            positions = np.arange(length)
            slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
            logits = torch.full((VOCAB,), -1e9)
            logits[next_token(self.slots[slots].tolist())] = 0.0
            rows.append(logits)
        return torch.stack(rows)


def reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def test_engine_runs_a_plugged_runner() -> None:
    runner = SlotRunner()
    assert isinstance(runner, Runner)
    engine = LLMEngine(runner, config=EngineConfig(block_size=4, max_num_batched_tokens=16,
                                                   max_num_seqs=4))
    assert engine.runner is runner and engine.max_model_len == 128
    prompts = [[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 10], [11] * 13]
    results = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [r.token_ids for r in results] == [reference(p, 6) for p in prompts]
    assert runner.steps > 1 and engine.kv.num_free_blocks == engine.kv.num_blocks
    with pytest.raises(InvalidParameterError, match="text needs a tokenizer"):
        engine.add_request("hello")


def test_engine_rejects_what_is_not_a_runner() -> None:
    with pytest.raises(InvalidParameterError, match=r"model: .*Runner.*got object"):
        LLMEngine(object())  # type: ignore[arg-type]


def test_engine_config_policy_as_spec_or_instance() -> None:
    engine = LLMEngine(SlotRunner(), config=EngineConfig(policy='priority:{"aging_rate": 0.5}'))
    assert isinstance(engine.scheduler.policy, PriorityPolicy)
    assert engine.scheduler.policy.aging_rate == 0.5
    fair = FairSharePolicy({"gold": 2.0})
    engine = LLMEngine(SlotRunner(), config=EngineConfig(policy=fair,
                                                         victim_policy="lowest_priority"))
    assert engine.scheduler.policy is fair
    assert type(engine.scheduler.victim_policy).__name__ == "LowestPriorityVictimPolicy"
    with pytest.raises(InvalidParameterError, match="policy"):
        EngineConfig(policy=3)  # type: ignore[arg-type]


def make_slot_runner(model: object, *, block_size: int, num_blocks: int | None,
                     kv_cache_bytes: int, dtype: object, device: str,
                     blocks: int = 64) -> SlotRunner:
    """A runner plugin's factory: called with the model and the engine's sizes."""
    return SlotRunner(num_blocks=num_blocks or blocks, block_size=block_size)


def test_engine_config_runner_names_a_runner_plugin(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from servekit.plugins import PluginArgumentError
    from servekit.server.cli import DEMO_MODEL

    info = tmp_path / "slot_runner-1.0.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: slot-runner\nVersion: 1.0\n")
    info.joinpath("entry_points.txt").write_text(
        "[servekit.plugins]\nrunner.slots = tests.engine.test_plugged_runner:make_slot_runner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = EngineConfig(block_size=4, runner='slots:{"blocks": 48}')
    engine = LLMEngine(DEMO_MODEL, config=config)
    assert isinstance(engine.runner, SlotRunner) and engine.runner.num_blocks == 48
    assert engine.tokenizer is not None  # still the model directory's tokenizer
    prompt = [5, 6, 7, 8, 9]
    [result] = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))
    assert result.token_ids == reference(prompt, 3)
    with pytest.raises(PluginArgumentError, match=r"runner plugin 'slots'.*'colour'"):
        LLMEngine(DEMO_MODEL, config=EngineConfig(runner='slots:{"colour": 1}'))
