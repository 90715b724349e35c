"""KVCacheManager and BlockPool: bad input, eviction order, hits, salts, collisions, events."""

from __future__ import annotations

import pytest

from servekit.errors import ServekitError
from servekit.kv import (
    AllBlocksCleared,
    BlockPool,
    BlockRemoved,
    BlockStored,
    DoubleFreeError,
    DuplicateSequenceError,
    InvalidAllocationError,
    InvalidBlockSizeError,
    KVCacheManager,
    KVEvent,
    KVSequence,
    OutOfBlocksError,
    UnknownHashAlgorithmError,
    UnknownSequenceError,
)


def run(mgr: KVCacheManager, seq: KVSequence) -> int:
    """Admit ``seq`` whole: look up, allocate, compute, commit. Returns the hit in tokens."""
    hit = mgr.get_num_cached_tokens(seq)
    assert mgr.allocate(seq, len(seq.token_ids), hit)
    mgr.commit(seq, len(seq.token_ids))
    return hit


@pytest.mark.parametrize("block_size", [0, 3, 6, -4, 2.0, 24])
def test_block_size_must_be_a_power_of_two(block_size: object) -> None:
    with pytest.raises(InvalidBlockSizeError, match="block_size"):
        KVCacheManager(8, block_size)  # type: ignore[arg-type]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(InvalidBlockSizeError, match="num_blocks"):
        KVCacheManager(0, 4)
    with pytest.raises(UnknownHashAlgorithmError, match="hash_algorithm"):
        KVCacheManager(4, 4, hash_algorithm="md5")


def test_allocate_beyond_free_fails_with_nothing_changed() -> None:
    mgr = KVCacheManager(4, 4)
    a = KVSequence("a", list(range(12)))
    assert mgr.allocate(a, 12)
    b = KVSequence("b", list(range(100, 108)))
    free_before = mgr.pool.free_block_ids()
    assert not mgr.allocate(b, 8)
    assert b.block_ids == [] and mgr.pool.free_block_ids() == free_before
    assert mgr.num_sequences == 1
    assert mgr.allocate(a, 16)  # grows into the last free block
    assert not mgr.allocate(b, 1)
    assert len(a.block_ids) == 4 and mgr.num_free_blocks == 0 and b.block_ids == []


def test_request_larger_than_the_pool_raises() -> None:
    mgr = KVCacheManager(4, 4)
    seq = KVSequence("a", list(range(17)))
    with pytest.raises(OutOfBlocksError, match="needs 5 blocks"):
        mgr.allocate(seq, 17)
    assert mgr.num_free_blocks == 4 and mgr.num_sequences == 0


def test_unknown_and_double_free() -> None:
    mgr = KVCacheManager(4, 4)
    seq = KVSequence("a", [1, 2, 3])
    with pytest.raises(UnknownSequenceError, match="'a'"):
        mgr.free(seq)
    assert mgr.allocate(seq, 3)
    mgr.free(seq)
    with pytest.raises(UnknownSequenceError) as info:
        mgr.free(seq)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ServekitError)
    assert mgr.num_free_blocks == 4


def test_pool_double_free_of_a_block() -> None:
    pool = BlockPool(4, 4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(DoubleFreeError, match="block"):
        pool.free(blocks[:1])
    assert sorted(pool.free_block_ids()) == [0, 1, 2, 3] and pool.num_free == 4
    held = pool.allocate(1)
    with pytest.raises(DoubleFreeError):
        pool.free([blocks[1], *held])  # tail first: held is released, then blocks[1] fails
    assert sorted(pool.free_block_ids()) == [0, 1, 2, 3] and pool.num_free == 4


def test_duplicate_ids_and_inconsistent_arguments() -> None:
    mgr = KVCacheManager(8, 4)
    a = KVSequence("a", list(range(8)))
    assert mgr.allocate(a, 8)
    with pytest.raises(DuplicateSequenceError, match="'a'"):
        mgr.allocate(KVSequence("a", [1]), 1)
    with pytest.raises(InvalidAllocationError, match="already holds"):
        mgr.allocate(a, 12, 4)
    with pytest.raises(InvalidAllocationError, match="num_computed_tokens"):
        mgr.commit(a, 9)
    b = KVSequence("b", list(range(8)))
    with pytest.raises(InvalidAllocationError, match="multiple of block_size"):
        mgr.allocate(b, 8, 3)


def test_stale_hit_is_an_error_not_wrong_kv() -> None:
    mgr = KVCacheManager(3, 4)
    run(mgr, a := KVSequence("a", list(range(9))))
    mgr.free(a)
    b = KVSequence("b", list(range(9)))
    assert mgr.get_num_cached_tokens(b) == 8
    assert mgr.allocate(c := KVSequence("c", [7] * 12), 12)  # evicts a's blocks
    with pytest.raises(InvalidAllocationError, match="get_num_cached_tokens"):
        mgr.allocate(b, 9, 8)
    assert mgr.num_sequences == 1 and c.block_ids


def test_hit_leaves_the_last_token_to_compute() -> None:
    mgr = KVCacheManager(8, 4)
    run(mgr, KVSequence("a", list(range(8))))
    assert mgr.get_num_cached_tokens(KVSequence("b", list(range(8)))) == 4
    assert mgr.get_num_cached_tokens(KVSequence("c", list(range(9)))) == 8
    assert mgr.get_num_cached_tokens(KVSequence("d", [0, 1, 2, 9, 4])) == 0
    assert mgr.prefix_queries == 8 + 8 + 9 + 5 and mgr.prefix_hits == 12


def test_uncommitted_blocks_are_not_hittable() -> None:
    mgr = KVCacheManager(8, 4)
    a = KVSequence("a", list(range(9)))
    assert mgr.allocate(a, 9)
    assert mgr.get_num_cached_tokens(KVSequence("b", list(range(9)))) == 0
    mgr.commit(a, 5)  # only the first block is written
    assert mgr.get_num_cached_tokens(KVSequence("b", list(range(9)))) == 4


def test_hit_shares_blocks_and_free_keeps_them_hittable() -> None:
    mgr = KVCacheManager(8, 4)
    a = KVSequence("a", list(range(10)))
    run(mgr, a)
    b = KVSequence("b", list(range(10)))
    assert run(mgr, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert mgr.pool.ref[a.block_ids[0]] == 2
    mgr.free(a)
    mgr.free(b)
    assert mgr.usage == 0.0
    c = KVSequence("c", list(range(10)))
    assert run(mgr, c) == 8


def test_eviction_order_lru_tail_first_uncached_first() -> None:
    mgr = KVCacheManager(6, 2)
    a = KVSequence("a", [1, 2, 3, 4, 5])  # blocks: 2 full (cached) + 1 partial
    run(mgr, a)
    head, second, partial = a.block_ids
    mgr.free(a)
    order = mgr.pool.free_block_ids()
    assert order[0] == partial  # uncached: reused first
    assert order[-2:] == [second, head]  # cached: tail before head, evicted last
    b = KVSequence("b", [9] * 9)
    assert mgr.allocate(b, 8)  # takes 4: the partial block, the 3 never-used, no cached one
    assert mgr.get_num_cached_tokens(KVSequence("x", [1, 2, 3, 4, 5])) == 4
    assert mgr.allocate(KVSequence("c", [8, 8]), 2)  # evicts `second` (a's tail) first
    assert mgr.get_num_cached_tokens(KVSequence("y", [1, 2, 3, 4, 5])) == 2


def test_cache_salt_isolates_tenants() -> None:
    mgr = KVCacheManager(16, 4)
    run(mgr, KVSequence("a", list(range(9)), cache_salt="t1"))
    assert mgr.get_num_cached_tokens(KVSequence("b", list(range(9)), cache_salt="t1")) == 8
    assert mgr.get_num_cached_tokens(KVSequence("c", list(range(9)), cache_salt="t2")) == 0
    assert mgr.get_num_cached_tokens(KVSequence("d", list(range(9)))) == 0


def test_hash_collisions_never_return_wrong_blocks() -> None:
    mgr = KVCacheManager(16, 2)
    mgr._hash_fn = lambda data, parent: 7  # every block collides
    run(mgr, KVSequence("a", [1, 2, 3, 4, 5]))
    assert mgr.get_num_cached_tokens(KVSequence("b", [1, 2, 9, 9, 5])) == 2
    assert mgr.get_num_cached_tokens(KVSequence("c", [5, 5, 3, 4, 5])) == 0
    # same tokens in block 1 but under a different first block: the parent link rejects it
    run(mgr, KVSequence("d", [6, 6, 3, 4, 5]))
    assert mgr.get_num_cached_tokens(KVSequence("e", [6, 6, 3, 4, 5])) == 0


def test_prefix_caching_disabled() -> None:
    events: list[KVEvent] = []
    mgr = KVCacheManager(8, 4, enable_prefix_caching=False, on_event=events.append)
    run(mgr, KVSequence("a", list(range(9))))
    assert mgr.get_num_cached_tokens(KVSequence("b", list(range(9)))) == 0
    assert events == [] and mgr.pool.num_cached == 0


def test_events_stored_removed_cleared() -> None:
    events: list[KVEvent] = []
    mgr = KVCacheManager(3, 2, on_event=events.append)
    a = KVSequence("a", [1, 2, 3, 4, 5])
    assert mgr.allocate(a, 5)
    mgr.commit(a, 3)
    mgr.commit(a, 5)
    h = a.block_hashes
    assert events == [
        BlockStored((h[0],), None, (1, 2), 2),
        BlockStored((h[1],), h[0], (3, 4), 2),
    ]
    mgr.free(a)
    assert not mgr.reset_prefix_cache() if mgr.num_sequences else True
    assert mgr.allocate(KVSequence("b", [0] * 6), 6)  # reuses the partial, then evicts both
    assert events[2:] == [BlockRemoved((h[1], h[0]))]
    assert not mgr.reset_prefix_cache()  # b holds blocks
    mgr.free(mgr._seqs["b"])
    assert mgr.reset_prefix_cache()
    assert events[-1] == AllBlocksCleared()


def count_hash_calls(mgr: KVCacheManager) -> list[int]:
    """Wrap the manager's hash function; the returned list grows by one per block hashed."""
    calls: list[int] = []
    inner = mgr._hash_fn

    def counting(data: bytes | memoryview, parent: int) -> int:
        calls.append(1)
        return inner(data, parent)

    mgr._hash_fn = counting
    return calls


def test_free_keeps_hashes_and_readmission_does_not_rehash() -> None:
    mgr = KVCacheManager(8, 4)
    calls = count_hash_calls(mgr)
    a = KVSequence("a", list(range(13)))
    run(mgr, a)
    hashes = list(a.block_hashes)
    mgr.free(a)
    assert a.block_ids == [] and a.block_hashes == hashes
    n = len(calls)
    assert run(mgr, a) == 12 and len(calls) == n


def test_fork_shares_full_blocks_and_copies_the_tail() -> None:
    mgr = KVCacheManager(8, 4)
    parent = KVSequence("p", list(range(10)))
    run(mgr, parent)
    child = KVSequence("c")
    copies = mgr.fork(parent, child)
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    assert child.block_ids[:2] == parent.block_ids[:2]
    assert copies == [(parent.block_ids[2], child.block_ids[2])]
    assert mgr.pool.ref[parent.block_ids[0]] == 2
    with pytest.raises(DuplicateSequenceError):
        mgr.fork(parent, child)
    with pytest.raises(InvalidAllocationError, match="differ"):
        mgr.fork(parent, KVSequence("d", [1]))
    mgr.free(parent)
    mgr.free(child)
    assert mgr.num_free_blocks == 8


def test_fork_without_a_free_block_for_the_tail() -> None:
    mgr = KVCacheManager(3, 4)
    parent = KVSequence("p", list(range(10)))
    run(mgr, parent)
    with pytest.raises(OutOfBlocksError, match="partial tail"):
        mgr.fork(parent, KVSequence("c"))
    assert mgr.num_sequences == 1 and mgr.pool.ref[parent.block_ids[0]] == 1


def test_a_hit_on_evicted_blocks_is_never_returned() -> None:
    mgr = KVCacheManager(16, 4)
    prefix = list(range(100,112))  # 3 blocks
    a, b = KVSequence("a", [*prefix, 1, 2, 3, 4, 5]), KVSequence("b", [*prefix, 6, 7, 8, 9, 10])
    run(mgr, a)
    assert run(mgr, b) == 12
    c = KVSequence("c", [*prefix[:8], 0, 0, 0, 0, 9])
    assert mgr.get_num_cached_tokens(c) == 8
    # evict every cached block: the hit must not be found any more
    mgr.free(a)
    mgr.free(b)
    held = KVSequence("hog", list(range(64)))
    assert mgr.allocate(held, 64)
    mgr.free(held)
    assert mgr.get_num_cached_tokens(KVSequence("d", [*prefix, 1])) == 0
