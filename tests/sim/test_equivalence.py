"""The simulator schedules exactly as the real LLMEngine does, for the same arrivals and the
same step-time function: same batches, same preemptions, same finish order."""

from __future__ import annotations

from typing import Any

import pytest

from servekit.sched.output import SchedulerOutput
from servekit.sched.params import SamplingParams
from servekit.sim import (
    ProfiledModel,
    ReplicaConfig,
    Scenario,
    simulate,
    workload_from_dict,
)
from servekit.sim.steptime import shape_of

torch = pytest.importorskip("torch")

VOCAB = 384
STEP = ProfiledModel([0.01, 2e-4, 1e-3, 2e-6, 1e-7])  # any deterministic function will do
Batch = tuple[float, tuple[tuple[str, int, int], ...], tuple[str, ...]]


def _batch(now: float, out: SchedulerOutput) -> Batch:
    entries = tuple((r.request_id, n, c) for r, n, c in
                    zip(out.requests, out.num_new_tokens, out.num_computed_tokens, strict=True))
    return (round(now, 9), entries, tuple(r.request_id for r in out.preempted))


def _scenario(rate: float) -> Scenario:
    workload = workload_from_dict({
        "rate": rate, "prompt": {"dist": "uniform", "low": 8, "high": 90},
        "output": {"dist": "uniform", "low": 4, "high": 40},
        "system_prompts": {"count": 2, "tokens": 32},
    })
    replicas = ReplicaConfig(count=1, max_num_seqs=8, max_num_batched_tokens=64, block_size=16,
                             num_blocks=24)
    return Scenario(workload, STEP, num_blocks=24, max_model_len=256, replicas=replicas,
                    duration=3.0, seed=11, vocab_size=VOCAB)


def _run_engine(trace: list[tuple[float, str, list[int], int]]) -> tuple[list[Batch], list[str]]:
    """Drive the real LLMEngine (a tiny seeded Llama) on a fake clock advanced by STEP."""
    import transformers as tf

    from servekit.engine import EngineConfig, LLMEngine

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        eos_token_id=0, bos_token_id=0, pad_token_id=0), dtype=torch.float32)
    now = [0.0]
    engine = LLMEngine(model, config=EngineConfig(
        block_size=16, num_blocks=24, max_num_seqs=8, max_num_batched_tokens=64,
        max_model_len=256), clock=lambda: now[0])
    pending = list(trace)
    batches: list[Batch] = []
    finished: list[str] = []
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= now[0]:
            _, rid, prompt, max_tokens = pending.pop(0)
            engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                      ignore_eos=True), request_id=rid)
        if not engine.has_unfinished_requests():
            now[0] = pending[0][0]
            continue
        plan = engine.schedule()
        batches.append(_batch(now[0], plan.out))
        now[0] += STEP.step_time(shape_of(plan.out))
        outputs = engine.finish(plan, engine.execute(plan))
        finished += [o.request_id for o in outputs if o.finished]
    return batches, finished


@pytest.mark.parametrize("rate", [6.0, 20.0])
def test_simulator_and_engine_give_the_same_schedule(rate: float) -> None:
    batches: list[Batch] = []
    seen: dict[str, tuple[float, list[int], int]] = {}

    def observe(replica: str, now: float, out: SchedulerOutput) -> None:
        batches.append(_batch(now, out))
        for r in out.requests:
            seen.setdefault(r.request_id, (r.arrival_time, r.prompt_token_ids, r.params.max_tokens))

    result = simulate(_scenario(rate), observer=observe)
    finished_sim = [r.id for r in sorted(result.records, key=lambda r: r.end)
                    if r.outcome == "finished"]
    trace = sorted((a, rid, p, m) for rid, (a, p, m) in seen.items())
    assert len(trace) == len(result.records)  # every request was scheduled at least once

    engine_batches, finished_engine = _run_engine(trace)

    assert engine_batches == batches
    assert _by_step(finished_engine, result) == _by_step(finished_sim, result)
    assert sorted(finished_engine) == sorted(finished_sim)
    if rate == 20.0:  # the busy run exercises what matters: preemption and prefix hits
        assert result.preemptions > 0
        assert any(b[2] for b in batches)
    assert result.router["prefix_block_hits"] > 0


def _by_step(order: list[str], result: Any) -> list[tuple[float, frozenset[str]]]:
    """Finish order, with the requests ending in the same step as one set (their order
    inside a step is the batch order on both sides, but the records only keep the time)."""
    end = {r.id: round(r.end, 9) for r in result.records}
    groups: list[tuple[float, set[str]]] = []
    for rid in order:
        if groups and groups[-1][0] == end[rid]:
            groups[-1][1].add(rid)
        else:
            groups.append((end[rid], {rid}))
    return [(t, frozenset(s)) for t, s in groups]
