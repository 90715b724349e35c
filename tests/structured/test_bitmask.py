"""The sampler's bitmask application: bit ``t % 32`` of word ``t // 32`` allows token ``t``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.engine.sampler import apply_token_bitmask


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 100), seed=st.integers(0, 2**16),
       data=st.data())
def test_apply_token_bitmask_matches_a_per_token_reference(
        rows: int, vocab: int, seed: int, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    picked = sorted(data.draw(st.lists(st.integers(0, rows - 1), unique=True, min_size=1)))
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(picked), words), generator=g,
                            dtype=torch.int32)
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, picked)
    expected = logits.clone()
    for i, row in enumerate(picked):
        for t in range(vocab):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    assert torch.equal(ours, expected)
