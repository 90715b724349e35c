"""ModelRunner + PackedBatchBuilder: packed mixed steps give the model's own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from servekit.engine.batch import PackedBatchBuilder
from servekit.engine.runner import ModelRunner


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("planned", [True, False], ids=["planned", "stateless"])
def test_packed_chunked_steps_match_a_plain_forward(
    family: str, planned: bool, request: pytest.FixtureRequest,
) -> None:
    from transformers import AutoModelForCausalLM

    path: Path = request.getfixturevalue(f"{family}_dir")
    reference = AutoModelForCausalLM.from_pretrained(path)
    runner = ModelRunner(path, block_size=4, num_blocks=32, plan_attention=planned)
    assert runner.use_plan is planned
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, 300, (14,), generator=g).tolist()
    b = torch.randint(1, 300, (6,), generator=g).tolist()
    with torch.inference_mode():
        ref_a = reference(torch.tensor([a])).logits[0]
        ref_b = reference(torch.tensor([b])).logits[0, -1]
    builder = PackedBatchBuilder(4, 4, 8)
    tables = [[3, 7, 1, 9], [0, 5]]
    # step 1: the first 9 tokens of `a` (no sample) and all of `b` (samples)
    step1 = runner.execute(builder.build([a, b], tables, [0, 0], [9, 6], [False, True]))
    # step 2: the rest of `a` over its cached prefix (samples)
    step2 = runner.execute(builder.build([a], tables[:1], [9], [5], [True]))
    torch.testing.assert_close(step1[0], ref_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step2[0], ref_a[-1], rtol=1e-4, atol=1e-4)
    # step 3: a decode of `a` next to a fresh prefill of `b` in another block table
    nxt = [*a, int(ref_a[-1].argmax())]
    with torch.inference_mode():
        ref_next = reference(torch.tensor([nxt])).logits[0, -1]
    step3 = runner.execute(builder.build([nxt, b], [tables[0], [2, 4]], [14, 0], [1, 6],
                                         [True, True]))
    torch.testing.assert_close(step3[0], ref_next, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step3[1], ref_b, rtol=1e-4, atol=1e-4)
