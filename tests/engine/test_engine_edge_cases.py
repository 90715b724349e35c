"""Engine edge cases: abort racing a deadline, stop string on the last token, seeds, zero noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from servekit.engine import EngineConfig, LLMEngine
from servekit.sched.params import InvalidParameterError, SamplingParams


def test_abort_between_phases_of_a_deadline_expiry_still_reports_the_final(
    llama_dir: Path,
) -> None:
    # The deadline passes in schedule(); an abort arriving while the step is in flight (the
    # AsyncEngine runs execute in a thread) must still hand back the request's final output:
    # otherwise neither abort() nor finish() reports it and its stream ends without one.
    now = [0.0]
    engine = LLMEngine(llama_dir, config=EngineConfig(num_blocks=32, block_size=4),
                       clock=lambda: now[0])
    keep = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), deadline=1.0)
    now[0] = 2.0
    plan = engine.schedule()
    aborted = engine.abort(rid)
    outputs = engine.finish(plan, engine.execute(plan))
    finals = [o for o in [aborted, *outputs] if o is not None and o.request_id == rid]
    assert len(finals) == 1 and finals[0].finished
    assert finals[0].finish_reason == "abort"
    assert any(o.request_id == keep for o in outputs)


def _deltas(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[str]:
    rid = engine.add_request(prompt, params)
    texts: list[str] = []
    while engine.has_unfinished_requests():
        texts += [o.new_text for o in engine.step() if o.request_id == rid]
    return texts


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_with_stop(
    llama_dir: Path,
) -> None:
    # docs/engine.md: on a stop-string match the request finishes with "stop", also when the
    # same token reached max_tokens (vLLM reports "stop" there too)
    engine = LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, block_size=4))
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for seed in range(40):
        prompt = [(seed * 37 + i * 11) % 300 + 1 for i in range(5)]
        texts = _deltas(engine, prompt, free)
        last = texts[-1]
        if last.strip() and last not in "".join(texts[:-1]) + last[:-1]:
            break
    else:
        raise AssertionError("no prompt whose last delta is a fresh stop string")
    stopped = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[last])
    res = engine.generate([prompt], stopped)[0]
    assert res.text == "".join(texts[:-1])
    assert res.finish_reason == "stop"


def test_a_seed_torch_cannot_take_is_refused_without_leaving_the_request_queued(
    llama_dir: Path,
) -> None:
    engine = LLMEngine(llama_dir, config=EngineConfig(num_blocks=32, block_size=4))
    with pytest.raises(InvalidParameterError) as info:  # torch's generators take no more
        engine.add_request([1, 2, 3], SamplingParams(temperature=1.0, seed=2**64), request_id="x")
    assert info.value.param == "seed"
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=-(2**63)).seed
    assert not engine.has_unfinished_requests()  # no orphan the engine would run untracked
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="x")  # id still free



def test_a_zero_exponential_draw_never_picks_a_filtered_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from servekit.engine.sampler import SamplingBatch, _sample_random

    def zero_exponential(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.zero_()

    monkeypatch.setattr(torch.Tensor, "exponential_", zero_exponential)
    batch = SamplingBatch(
        num_rows=1, all_greedy=False, greedy=None, temperature=None, top_k=None, top_p=None,
        min_p=None, repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
        prompt_ids=None, output_ids=None, generators={}, banned={}, max_logprobs=None,
    )
    logits = torch.tensor([[float("-inf"), 0.7, 0.3]])  # token 0 is filtered out
    assert _sample_random(logits, batch, torch.Generator()).tolist() != [0]
