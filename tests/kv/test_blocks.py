"""BlockPool internals: the open-addressing hash index and the free list."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from servekit.kv.blocks import BlockPool


@settings(max_examples=150)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200)), max_size=60))
def test_hash_index_matches_a_dict(ops: list[tuple[bool, int]]) -> None:
    """Clustered hashes (many share a home slot, runs wrap around) against a dict model."""
    pool = BlockPool(16, 1)  # 32 slots
    model: dict[int, int] = {}
    for insert, x in ops:
        if insert and len(model) < 16 and x not in model:
            pool._insert(x, x + 1000)
            model[x] = x + 1000
        elif not insert and model:
            victim = sorted(model)[x % len(model)]
            pool._delete(victim)
            del model[victim]
        assert pool.cached_blocks() == model and pool.num_cached == len(model)
        for h in range(0, 201, 7):
            assert pool.lookup(h) == model.get(h, -1)


def test_free_list_starts_in_id_order_and_touch_unlinks(speedups: bool) -> None:
    pool = BlockPool(5, 2)
    assert pool.speedups is speedups
    assert pool.free_block_ids() == [0, 1, 2, 3, 4]
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_free == 3
    pool.free(a)  # uncached: pushed at the head, tail block first
    assert pool.free_block_ids() == [0, 1, 2, 3, 4]
    pool.touch([3])
    assert pool.free_block_ids() == [0, 1, 2, 4] and pool.ref[3] == 1 and pool.num_free == 4
    pool.touch([3])
    pool.free([3])
    assert pool.ref[3] == 1 and pool.num_free == 4


def test_hash_index_deletion_across_the_wrap() -> None:
    pool = BlockPool(16, 1)  # 32 slots: hashes 31, 63, 95 all start at slot 31 and wrap
    for h in (31, 63, 95, 30, 0):
        pool._insert(h, h)
    pool._delete(31)
    assert pool.cached_blocks() == {63: 63, 95: 95, 30: 30, 0: 0}
    for h in (63, 95, 30, 0):
        assert pool.lookup(h) == h
    pool._delete(30)
    pool._delete(63)
    assert pool.lookup(95) == 95 and pool.lookup(0) == 0 and pool.lookup(31) == -1
