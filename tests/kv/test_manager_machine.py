"""Stateful property test of KVCacheManager + BlockPool against a model of the KV contents.

The model records, for every written slot, the exact context its KV depends on (cache salt and
all tokens up to and including that position). Every prefix hit, and every live sequence after
every step, must read back its own context from its blocks: so a hit never returns wrong KV, and
eviction never takes a block still in use.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from servekit.kv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    KVEvent,
    KVSequence,
    OutOfBlocksError,
    UnknownSequenceError,
)

Context = tuple[str | None, tuple[int, ...]]

tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)
salts = st.sampled_from([None, None, "a", "b"])


def colliding_hash(data: bytes | memoryview, parent: int) -> int:
    """A terrible hash (8 values): forces collisions the pool must catch by verification."""
    return (len(bytes(data)) + sum(bytes(data)) + parent) % 8


class KVMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.events: list[KVEvent] = []
        self.content: dict[int, dict[int, Context]] = {}
        self.computed: dict[str, int] = {}
        self.live: dict[str, KVSequence] = {}
        self.freed: dict[str, KVSequence] = {}
        self.counter = 0

    @initialize(
        num_blocks=st.integers(3, 20),
        block_size=st.sampled_from([1, 2, 4]),
        weak_hash=st.booleans(),
        algorithm=st.sampled_from(["xxhash", "sha256"]),
    )
    def setup(self, num_blocks: int, block_size: int, weak_hash: bool, algorithm: str) -> None:
        self.mgr = KVCacheManager(
            num_blocks,
            block_size,
            hash_algorithm=algorithm,
            on_event=self.events.append,
        )
        if weak_hash:
            self.mgr._hash_fn = colliding_hash
        self.bs = block_size

    # -- model helpers ---------------------------------------------------------------------

    def ctx(self, seq: KVSequence, pos: int) -> Context:
        return (seq.cache_salt, tuple(seq.token_ids[: pos + 1]))

    def check_reads(self, seq: KVSequence, upto: int) -> None:
        for pos in range(upto):
            block = seq.block_ids[pos // self.bs]
            got = self.content.get(block, {}).get(pos % self.bs)
            assert got == self.ctx(seq, pos), f"{seq.seq_id} reads wrong KV at position {pos}"

    def compute(self, seq: KVSequence, start: int, end: int) -> None:
        for pos in range(start, end):
            block = seq.block_ids[pos // self.bs]
            self.content.setdefault(block, {})[pos % self.bs] = self.ctx(seq, pos)
        self.computed[seq.seq_id] = end
        self.mgr.commit(seq, end)

    def snapshot(self) -> tuple[object, ...]:
        p = self.mgr.pool
        return (
            p.free_block_ids(),
            list(p.ref),
            p.cached_blocks(),
            p.num_free,
            self.mgr.num_sequences,
        )

    def too_big(self, seq: KVSequence, end: int, hit: int = 0) -> bool:
        """A request larger than the whole pool raises OutOfBlocksError, changing nothing."""
        if -(-end // self.bs) <= self.mgr.num_blocks:
            return False
        before = self.snapshot(), list(seq.block_ids)
        with pytest.raises(OutOfBlocksError):
            self.mgr.allocate(seq, end, hit)
        assert (self.snapshot(), seq.block_ids) == before
        return True

    def admit(self, seq: KVSequence, chunk: int) -> bool:
        hit = self.mgr.get_num_cached_tokens(seq)
        assert hit % self.bs == 0 and 0 <= hit < len(seq.token_ids)
        end = min(len(seq.token_ids), hit + chunk)
        before = self.snapshot()
        if self.too_big(seq, end, hit):
            return False
        if not self.mgr.allocate(seq, end, hit):
            assert self.snapshot() == before, "a failed allocate changed the pool"
            assert seq.block_ids == []
            return False
        assert len(seq.block_ids) == -(-end // self.bs)
        self.check_reads(seq, hit)
        self.live[seq.seq_id] = seq
        self.compute(seq, hit, end)
        return True

    # -- rules -----------------------------------------------------------------------------

    @rule(target=seqs, tokens=tokens_st, salt=salts, chunk=st.integers(1, 16))
    def new_sequence(self, tokens: list[int], salt: str | None, chunk: int) -> object:
        self.counter += 1
        seq = KVSequence(f"s{self.counter}", tokens, cache_salt=salt)
        if self.admit(seq, chunk):
            return seq
        self.freed[seq.seq_id] = seq
        return multiple()

    @rule(seq=seqs, chunk=st.integers(1, 8), new=st.lists(st.integers(0, 2), max_size=3))
    def step(self, seq: KVSequence, chunk: int, new: list[int]) -> None:
        """Compute the next chunk of a live sequence, appending tokens when it is caught up."""
        if seq.seq_id not in self.live:
            return
        done = self.computed[seq.seq_id]
        if done == len(seq.token_ids):
            seq.token_ids.extend(new)
        end = min(len(seq.token_ids), done + chunk)
        blocks = list(seq.block_ids)
        if self.too_big(seq, end):
            return
        before = self.snapshot()
        if self.mgr.allocate(seq, end):
            assert seq.block_ids[: len(blocks)] == blocks
            self.compute(seq, done, end)
        else:
            assert self.snapshot() == before and seq.block_ids == blocks

    @rule(target=seqs, seq=seqs)
    def fork(self, seq: KVSequence) -> object:
        if seq.seq_id not in self.live:
            return multiple()
        self.counter += 1
        child = KVSequence(f"s{self.counter}")
        before = self.snapshot()
        try:
            copies = self.mgr.fork(seq, child)
        except OutOfBlocksError:  # only when no block is free for the partial tail copy
            assert self.mgr.num_free_blocks == 0
            assert self.snapshot() == before
            return multiple()
        for src, dst in copies:
            self.content[dst] = dict(self.content.get(src, {}))
        self.live[child.seq_id] = child
        done = min(self.computed[seq.seq_id], len(child.block_ids) * self.bs)
        self.computed[child.seq_id] = done
        self.check_reads(child, done)
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq: KVSequence) -> None:
        if seq.seq_id not in self.live:
            return
        self.mgr.free(seq)
        del self.live[seq.seq_id]
        self.freed[seq.seq_id] = seq
        assert seq.block_ids == []

    @precondition(lambda self: bool(self.freed))
    @rule(data=st.data())
    def free_again_is_an_error(self, data: st.DataObject) -> None:
        seq = self.freed[data.draw(st.sampled_from(sorted(self.freed)))]
        with pytest.raises(UnknownSequenceError):
            self.mgr.free(seq)

    @precondition(lambda self: bool(self.freed))
    @rule(data=st.data(), chunk=st.integers(1, 16))
    def readmit(self, data: st.DataObject, chunk: int) -> None:
        """A preempted sequence comes back: its kept hashes find its own cached prefix."""
        seq = self.freed.pop(data.draw(st.sampled_from(sorted(self.freed))))
        if not self.admit(seq, chunk):
            self.freed[seq.seq_id] = seq

    @rule()
    def reset(self) -> None:
        held = self.mgr.num_free_blocks < self.mgr.num_blocks
        n_events = len(self.events)
        assert self.mgr.reset_prefix_cache() is (not held)
        if not held:
            assert self.events[n_events:] == [AllBlocksCleared()]
            assert self.mgr.pool.num_cached == 0

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def refcounts_and_free_list(self) -> None:
        if not hasattr(self, "mgr"):
            return
        pool = self.mgr.pool
        owners: Counter[int] = Counter()
        for seq in self.live.values():
            assert len(set(seq.block_ids)) == len(seq.block_ids), "a block owned twice"
            owners.update(seq.block_ids)
        free = pool.free_block_ids()
        assert len(free) == len(set(free)) == pool.num_free
        for b in range(pool.num_blocks):
            assert pool.ref[b] == owners[b], f"block {b}: ref {pool.ref[b]} != {owners[b]} owners"
        assert set(free) == {b for b in range(pool.num_blocks) if owners[b] == 0}
        assert pool.num_free + len(owners) == pool.num_blocks
        assert self.mgr.usage == pytest.approx(len(owners) / pool.num_blocks)
        # reverse links agree with forward links
        sentinel = pool.num_blocks
        prev = sentinel
        for b in free:
            assert pool.prev[b] == prev
            prev = b
        assert pool.prev[sentinel] == prev

    @invariant()
    def cache_table_consistent(self) -> None:
        if not hasattr(self, "mgr"):
            return
        pool = self.mgr.pool
        cached = pool.cached_blocks()
        assert len(cached) == pool.num_cached
        for h, b in cached.items():
            assert pool.hashes[b] == h and pool.lookup(h) == b
            stored = tuple(int(t) for t in pool.tokens[b])
            written = self.content[b]
            assert tuple(written[o][1][-1] for o in range(self.bs)) == stored
        assert sum(h >= 0 for h in pool.hashes) == len(cached)

    @invariant()
    def live_sequences_read_their_own_kv(self) -> None:
        for seq in self.live.values():
            self.check_reads(seq, self.computed[seq.seq_id])

    @invariant()
    def events_replay_to_cache_contents(self) -> None:
        if not hasattr(self, "mgr"):
            return
        replay: set[int] = set()
        for ev in self.events:
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size
                replay.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                replay.difference_update(ev.block_hashes)
            else:
                replay.clear()
        assert replay == set(self.mgr.pool.cached_blocks())

    def teardown(self) -> None:
        if not hasattr(self, "mgr"):
            return
        for seq in list(self.live.values()):
            self.mgr.free(seq)
        assert self.mgr.num_free_blocks == self.mgr.num_blocks
        assert self.mgr.usage == 0.0
        assert self.mgr.num_sequences == 0
        assert self.mgr.reset_prefix_cache()


KVMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestKVMachine = KVMachine.TestCase
