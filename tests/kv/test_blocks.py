"""BlockPool on its own: the intrusive free list, LRU order of cached blocks, the hash index."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from servekit.kv import AllBlocksCleared, BlockPool, BlockRemoved, KVEvent
from servekit.kv.blocks import NO_HASH, ROOT_LINK, OutOfBlocksError


def test_free_list_starts_in_id_order_and_touch_unlinks() -> None:
    pool = BlockPool(5, 2)
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


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3, 4)
    pool.allocate(2)
    with pytest.raises(OutOfBlocksError, match="2 blocks asked for, 1 free"):
        pool.allocate(2)
    assert pool.free_block_ids() == [2] and pool.num_free == 1


def test_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(4, 1, on_event=events.append)
    blocks = pool.allocate(4)
    for b in blocks[:3]:
        pool.register(b, 100 + b, ROOT_LINK, [b])
    pool.free([blocks[1]])
    pool.free([blocks[0], blocks[2], blocks[3]])  # tail first: 3 (uncached, head), 2, 0
    assert pool.free_block_ids() == [3, 1, 2, 0]
    assert pool.lookup(101) == 1 and pool.num_cached == 3
    pool.touch([2])  # a hit on a free cached block takes it off the free list, still cached
    assert pool.free_block_ids() == [3, 1, 0] and pool.lookup(102) == 2
    assert pool.allocate(2) == [3, 1]
    assert events == [BlockRemoved((101,))]
    assert pool.lookup(101) == -1 and pool.hashes[1] == NO_HASH and pool.tokens[1] is None
    assert pool.cached_blocks() == {100: 0, 102: 2}


def test_reset_needs_every_block_free() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(2, 1, on_event=events.append)
    (b,) = pool.allocate(1)
    pool.register(b, 7, ROOT_LINK, [1])
    assert not pool.reset() and pool.num_cached == 1
    pool.free([b])
    assert pool.reset() and pool.num_cached == 0 and pool.hashes == [NO_HASH, NO_HASH]
    assert events == [AllBlocksCleared()]


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch"]), st.integers(0, 7)),
                max_size=60))
def test_free_list_links_and_counts_stay_consistent(ops: list[tuple[str, int]]) -> None:
    """Random allocate/touch/free against a model of ref counts; the ring's links agree."""
    pool = BlockPool(8, 1)
    refs = [0] * 8
    for op, x in ops:
        if op == "alloc" and pool.num_free:
            for b in pool.allocate(1 + x % pool.num_free):
                assert refs[b] == 0
                refs[b] = 1
        elif op == "free" and refs[x]:
            pool.free([x])
            refs[x] -= 1
        elif op == "touch":
            pool.touch([x])
            refs[x] += 1
        free = pool.free_block_ids()
        assert pool.ref == refs and sorted(free) == [b for b in range(8) if refs[b] == 0]
        assert pool.num_free == len(free)
        prev = pool.prev
        for a, b in zip([8, *free], [*free, 8], strict=True):
            assert prev[b] == a
