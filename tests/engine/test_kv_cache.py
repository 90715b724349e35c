"""KV tensors and the slot-mapping / block-table builders."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from servekit.engine.kv_cache import (
    KVCache,
    KVCacheSizeError,
    build_block_tables,
    build_slot_mapping,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_cache_layout_and_budget(dtype: torch.dtype) -> None:
    per_block = KVCache.bytes_per_block(2, 16, 2, 8, dtype)
    assert per_block == 2 * 2 * 16 * 2 * 8 * torch.empty((), dtype=dtype).element_size()
    cache = KVCache.from_memory_budget(per_block * 5 + 1, 2, 16, 2, 8, dtype=dtype)
    assert cache.num_blocks == 5 and cache.num_layers == 2
    k, v = cache[1]
    assert k.shape == v.shape == (5, 16, 2, 8) and k.dtype == dtype and k is not v
    with pytest.raises(KVCacheSizeError, match="budget_bytes"):
        KVCache.from_memory_budget(per_block - 1, 2, 16, 2, 8, dtype=dtype)
    with pytest.raises(KVCacheSizeError, match="head_dim"):
        KVCache(1, 4, 16, 2, 0)


def test_copy_blocks() -> None:
    cache = KVCache(2, 4, 2, 1, 2, dtype=torch.float32)
    for t in cache.key_caches + cache.value_caches:
        t.copy_(torch.randn_like(t))
    cache.copy_blocks([(0, 3), (1, 2)])
    for t in cache.key_caches + cache.value_caches:
        assert torch.equal(t[3], t[0]) and torch.equal(t[2], t[1])


def test_block_tables_padded_int32() -> None:
    table = build_block_tables([[3, 1], [], [7]])
    assert table.dtype == torch.int32
    assert table.tolist() == [[3, 1], [0, 0], [7, 0]]
    assert build_block_tables([[1]], max_blocks=3).tolist() == [[1, 0, 0]]
    with pytest.raises(KVCacheSizeError, match="max_blocks"):
        build_block_tables([[1, 2]], max_blocks=1)


@given(st.data(), st.sampled_from([1, 2, 4, 16]))
def test_slot_mapping_matches_a_plain_loop(data: st.DataObject, block_size: int) -> None:
    n = data.draw(st.integers(0, 4))
    block_ids = [data.draw(st.lists(st.integers(0, 50), max_size=4)) for _ in range(n)]
    starts, ends = [], []
    for blocks in block_ids:
        end = data.draw(st.integers(0, len(blocks) * block_size))
        starts.append(data.draw(st.integers(0, end)))
        ends.append(end)
    pad = data.draw(st.integers(0, 3))
    expected = [
        blocks[p // block_size] * block_size + p % block_size
        for blocks, s, e in zip(block_ids, starts, ends, strict=True)
        for p in range(s, e)
    ]
    got = build_slot_mapping(block_ids, starts, ends, block_size, pad_to=len(expected) + pad)
    assert got.dtype == torch.int64
    assert got.tolist() == expected + [-1] * pad


def test_slot_mapping_bad_input() -> None:
    with pytest.raises(KVCacheSizeError, match="beyond"):
        build_slot_mapping([[1]], [0], [3], 2)
    with pytest.raises(KVCacheSizeError, match="differ in length"):
        build_slot_mapping([[1]], [0, 0], [1, 1], 2)
    with pytest.raises(KVCacheSizeError, match="pad_to"):
        build_slot_mapping([[1]], [0], [2], 2, pad_to=1)
    assert build_slot_mapping([[1]], [1], [2], 2, dtype=torch.int32).tolist() == [3]
