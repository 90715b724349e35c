"""The engine's per-step-planned CPU attention equals servekit.ops.reference on paged layouts."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.engine.cpu_attention import CpuAttentionPlan, cpu_paged_attention
from servekit.ops.reference import paged_attention, store_kv

BS, HKV, G, D, BLOCKS = 4, 2, 2, 8, 64


@settings(max_examples=40)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 20)), min_size=1, max_size=6),
    window=st.sampled_from([None, 3]),
    null_block=st.booleans(),
    group_size=st.sampled_from([1, 2, 16]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(seqs: list[tuple[int, int]], window: int | None, null_block: bool,
                           group_size: int, seed: int) -> None:
    """Each sequence: ``(new tokens, cached tokens)``; unused cache slots are NaN-poisoned
    (except the zero null block, an extra block no table holds)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((BLOCKS + 1, BS, HKV, D), float("nan"))
    v_cache = torch.full((BLOCKS + 1, BS, HKV, D), float("nan"))
    k_cache[BLOCKS] = 0.0
    v_cache[BLOCKS] = 0.0
    free = torch.randperm(BLOCKS, generator=g).tolist()
    tables, lens, starts, slots = [], [], [0], []
    for new, cached in seqs:
        ctx = new + cached
        blocks = [free.pop() for _ in range(-(-ctx // BS))]
        tables.append(blocks)
        lens.append(ctx)
        starts.append(starts[-1] + new)
        for pos in range(ctx):
            slot = blocks[pos // BS] * BS + pos % BS
            if pos < cached:  # the cached prefix is already in the cache
                k_cache.view(-1, HKV, D)[slot] = torch.randn(HKV, D, generator=g)
                v_cache.view(-1, HKV, D)[slot] = torch.randn(HKV, D, generator=g)
            else:
                slots.append(slot)
    tokens = starts[-1]
    key = torch.randn(tokens, HKV, D, generator=g)
    value = torch.randn(tokens, HKV, D, generator=g)
    query = torch.randn(tokens, HKV * G, D, generator=g)
    store_kv(key, value, k_cache, v_cache, torch.tensor(slots))
    width = max(len(t) for t in tables)
    table = np.zeros((len(seqs), width), dtype=np.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    seq_lens = np.array(lens, dtype=np.int32)
    qsl = np.array(starts, dtype=np.int32)
    expected = paged_attention(query, k_cache, v_cache, torch.from_numpy(table),
                               torch.from_numpy(seq_lens), torch.from_numpy(qsl),
                               scale=D**-0.5, sliding_window=window)
    plan = CpuAttentionPlan.build(table, seq_lens, qsl, BS, sliding_window=window,
                                  null_block=BLOCKS if null_block else None, group_size=group_size)
    got = cpu_paged_attention(plan, query, key, value, k_cache, v_cache, D**-0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
