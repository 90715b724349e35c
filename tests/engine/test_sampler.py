"""The batched sampler: greedy, filters, penalties, seeds, logprobs, NaN rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.engine.sampler import Sampler, SamplingBatch
from servekit.sched.params import InvalidParameterError, SamplingParams

V = 64
DEV = torch.device("cpu")
sampler = Sampler()


def batch(params: list[SamplingParams], **kw: object) -> SamplingBatch:
    return SamplingBatch.build(params, vocab_size=V, device=DEV, **kw)  # type: ignore[arg-type]


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_even_in_a_mixed_batch() -> None:
    x = logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5),
              SamplingParams(temperature=0), SamplingParams(top_k=3)]
    out = sampler(x.clone(), batch(params))
    assert out.token_ids[0] == x[0].argmax() and out.token_ids[2] == x[2].argmax()
    assert out.logprobs is None and not out.bad_rows.any()


@pytest.mark.parametrize("p", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                               SamplingParams(min_p=1.0), SamplingParams(temperature=1e-4)])
def test_degenerate_filters_reduce_to_argmax(p: SamplingParams) -> None:
    x = logits(8, seed=1)
    out = sampler(x.clone(), batch([p] * 8))
    assert torch.equal(out.token_ids, x.argmax(-1))


@settings(max_examples=25)
@given(k=st.integers(1, 10), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_sample_stays_inside_top_k_and_nucleus(k: int, top_p: float, seed: int) -> None:
    x = logits(16, seed)
    torch.manual_seed(seed)
    out = sampler(x.clone(), batch([SamplingParams(top_k=k, top_p=top_p)] * 16))
    order = x.argsort(-1, descending=True)
    probs = torch.softmax(x, -1).gather(1, order)
    for row in range(16):
        rank = int((order[row] == out.token_ids[row]).nonzero())
        assert rank < k
        assert rank == 0 or float(probs[row, :rank].sum()) < top_p + 1e-6


def test_sampling_follows_the_distribution() -> None:
    x = torch.full((4000, V), -1e9)
    x[:, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    torch.manual_seed(0)
    out = sampler(x, batch([SamplingParams()] * 4000))
    freq = torch.bincount(out.token_ids, minlength=V)[:3].float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = logits(6, seed=3)
    p = SamplingParams(temperature=1.0, seed=7)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    alone, mixed = [], []
    for step in range(20):
        torch.manual_seed(step)  # the unseeded rows draw differently every step
        alone.append(sampler(x[2:3].clone(), batch([p], generators={0: g1})).token_ids.item())
        b = batch([SamplingParams(), SamplingParams(), p], generators={2: g2})
        mixed.append(sampler(x[[0, 1, 2]].clone(), b).token_ids[2].item())
    assert alone == mixed and len(set(alone)) > 1


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = logits(2, seed=4)
    prompt, output = [[1, 2, 3], [5]], [[3, 9], [9, 9, 10]]
    out = sampler(x.clone(), batch([SamplingParams(temperature=0, repetition_penalty=1.7)] * 2,
                                   prompt_ids=prompt, output_ids=output))
    seen = torch.tensor([[1, 2, 3, 3, 9], [5, 9, 9, 10, 10]])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(seen, x.clone())
    assert torch.equal(out.token_ids, expected.argmax(-1))


def test_presence_and_frequency_penalties_subtract_per_count() -> None:
    from servekit.engine.sampler import _apply_penalties

    x = torch.zeros(1, V)
    b = batch([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)],
              prompt_ids=[[4]], output_ids=[[7, 7, 8]])
    _apply_penalties(x, b)
    assert x[0, 7] == -(0.5 + 0.5) and x[0, 8] == -(0.5 + 0.25) and x[0, 4] == 0
    assert int((x != 0).sum()) == 2


def test_logprobs_are_raw_log_softmax_with_top_n() -> None:
    x = logits(3, seed=5)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=2.0),
              SamplingParams(temperature=0, logprobs=0)]
    out = sampler(x.clone(), batch(params))
    ref = torch.log_softmax(x, -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.top_ids[0], ref[0].topk(3).indices)
    assert torch.allclose(out.top_logprobs[0], ref[0].topk(3).values)


def test_nan_rows_are_flagged_and_others_unaffected() -> None:
    x = logits(3, seed=6)
    x[1, 5] = float("nan")
    out = sampler(x.clone(), batch([SamplingParams(temperature=0)] * 3))
    assert out.bad_rows.tolist() == [False, True, False]
    assert out.token_ids[0] == x[0].argmax() and out.token_ids[2] == x[2].argmax()


def test_banned_tokens_are_never_picked() -> None:
    x = logits(2, seed=8)
    top = int(x[0].argmax())
    out = sampler(x.clone(), batch([SamplingParams(temperature=0)] * 2, banned={0: [top]}))
    assert out.token_ids[0] != top and out.token_ids[1] == x[1].argmax()


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"), ({"temperature": float("nan")}, "temperature"),
])
def test_bad_parameters_are_rejected_by_name(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param and param in str(info.value)
