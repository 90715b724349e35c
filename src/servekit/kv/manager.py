"""KVCacheManager: the sequence-level API the scheduler calls (see docs/contracts.md).

One sequence's life: ``get_num_cached_tokens`` (prefix hit, in tokens) -> ``allocate`` (blocks for
the tokens to compute, hit blocks shared) -> the model writes KV -> ``commit`` (full written
blocks become hittable) -> ``allocate`` again as it grows -> ``free`` (blocks back to the pool,
still hittable until reused). ``fork`` shares a sequence's blocks with a child (parallel
sampling). Block hashes are computed once per sequence and kept across ``free``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from servekit.kv.blocks import ROOT_LINK, BlockPool, KVBlock, KVCacheError, OutOfBlocksError
from servekit.kv.events import BlockStored, KVEvent
from servekit.kv.hashing import extend_block_hashes, get_hash_fn

__all__ = [
    "DuplicateSequenceError",
    "InvalidAllocationError",
    "KVCacheManager",
    "KVSequence",
    "OutOfBlocksError",
    "UnknownSequenceError",
]

_NO_LINK: Final = -4  # a sequence whose commits stopped at a hash collision


class UnknownSequenceError(KVCacheError, KeyError):
    """The sequence holds nothing in this manager (never allocated, or already freed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateSequenceError(KVCacheError, ValueError):
    """Another live sequence object already uses this ``seq_id``."""


class InvalidAllocationError(KVCacheError, ValueError):
    """An allocate/commit/fork argument is inconsistent with the sequence (message names it)."""


class KVSequence:
    """A sequence's view of the KV cache: its tokens, its block table and its block hashes.

    The owner appends to ``token_ids``; ``block_ids`` and ``block_hashes`` are written only by
    the manager. The ``_kv_*`` slots are the manager's bookkeeping.
    """

    __slots__ = (
        "_kv_committed",
        "_kv_link",
        "block_hashes",
        "block_ids",
        "cache_salt",
        "seq_id",
        "token_ids",
    )

    def __init__(
        self, seq_id: str, token_ids: list[int] | None = None, cache_salt: str | None = None
    ) -> None:
        self.seq_id = seq_id
        self.token_ids: list[int] = [] if token_ids is None else token_ids
        self.cache_salt = cache_salt
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self._kv_committed = 0  # leading blocks of block_ids known to be cached
        self._kv_link = ROOT_LINK  # parent link for the next block to register

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seq_id={self.seq_id!r}, tokens={len(self.token_ids)}, "
            f"blocks={len(self.block_ids)})"
        )


class KVCacheManager:
    """Allocates KV blocks to sequences, with a verified, lazily evicted prefix cache.

    ``allocate`` is all or nothing: False and nothing changed when the free blocks do not
    suffice; :class:`OutOfBlocksError` when the pool could never hold the request.
    """

    __slots__ = (
        "_hash_fn",
        "_on_event",
        "_pending",
        "_seqs",
        "block_size",
        "enable_prefix_caching",
        "num_blocks",
        "pool",
        "prefix_hits",
        "prefix_queries",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        hash_algorithm: str = "xxhash",
        on_event: Callable[[KVEvent], None] | None = None,
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size, on_event=on_event)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = get_hash_fn(hash_algorithm)
        self._on_event = on_event
        self._seqs: dict[str, KVSequence] = {}
        # The hit found by the last get_num_cached_tokens: (seq, blocks, their serials then).
        self._pending: tuple[KVSequence, list[KVBlock], list[int]] | None = None
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- state -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (free blocks, cached or not)."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by live sequences."""
        return 1.0 - self.pool.num_free / self.num_blocks

    @property
    def num_sequences(self) -> int:
        """Sequences currently known to the manager (allocated and not freed)."""
        return len(self._seqs)

    # -- prefix lookup ---------------------------------------------------------------------

    def _find_hit(self, seq: KVSequence) -> list[KVBlock]:
        """Longest verified cached prefix, leaving the last token out."""
        bs = self.block_size
        tokens, salt = seq.token_ids, seq.cache_salt
        max_blocks = (len(tokens) - 1) // bs
        hashes = seq.block_hashes
        if len(hashes) < max_blocks:
            extend_block_hashes(hashes, tokens, bs, max_blocks, salt, self._hash_fn)
        cached = self.pool.cached
        link = ROOT_LINK
        hit: list[KVBlock] = []
        for i in range(max_blocks):
            b = cached.get(hashes[i])
            if (b is None or b.parent != link or b.salt != salt
                    or b.token_ids != tokens[i * bs : (i + 1) * bs]):
                break
            hit.append(b)
            link = b.serial
        return hit

    def get_num_cached_tokens(self, seq: KVSequence) -> int:
        """Longest verified prefix-cache hit for ``seq`` (which holds no blocks), in tokens.

        A multiple of ``block_size`` and always below ``len(seq.token_ids)``: the last token is
        always computed. Allocates nothing; counts the query and the hit. Call it right before
        ``allocate`` for the same sequence.
        """
        self.prefix_queries += len(seq.token_ids)
        if not self.enable_prefix_caching or seq.block_ids:
            self._pending = None
            return 0
        hit = self._find_hit(seq)
        self._pending = (seq, hit, [b.serial for b in hit])
        self.prefix_hits += len(hit) * self.block_size
        return len(hit) * self.block_size

    def _take_hit(self, seq: KVSequence, num_blocks: int) -> list[KVBlock]:
        """The first ``num_blocks`` blocks of ``seq``'s hit: the pending one while no block of
        it was evicted or re-registered since, else a fresh lookup."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is seq and len(pending[1]) >= num_blocks:
            hit = pending[1][:num_blocks]
            if [b.serial for b in hit] == pending[2][:num_blocks]:
                return hit
        hit = self._find_hit(seq)[:num_blocks]
        if len(hit) < num_blocks:
            raise InvalidAllocationError(
                f"num_cached_tokens={num_blocks * self.block_size} exceeds the current prefix "
                f"hit of sequence {seq.seq_id!r} ({len(hit) * self.block_size} tokens); call "
                "get_num_cached_tokens right before allocate"
            )
        return hit

    # -- allocate / commit / free ----------------------------------------------------------

    def allocate(self, seq: KVSequence, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make ``seq.block_ids`` cover its first ``num_tokens`` tokens (a total, not new ones).

        For a sequence holding no blocks, its first ``num_cached_tokens // block_size`` blocks
        are the hit just returned by :meth:`get_num_cached_tokens`. All or nothing: returns False
        with nothing changed when not enough blocks are free.
        """
        bs = self.block_size
        block_ids = seq.block_ids
        want = -(-num_tokens // bs)
        need = want - len(block_ids)
        if need <= 0 and block_ids and not num_cached_tokens:
            return True  # the common decode step: the last block has room
        if want > self.num_blocks:
            raise OutOfBlocksError(
                f"sequence {seq.seq_id!r} needs {want} blocks for num_tokens={num_tokens}; "
                f"the pool has {self.num_blocks}"
            )
        pool = self.pool
        free = pool.num_free
        hit: list[KVBlock] = []
        if num_cached_tokens:
            if block_ids:
                raise InvalidAllocationError(
                    f"num_cached_tokens={num_cached_tokens} given for sequence {seq.seq_id!r}, "
                    "which already holds blocks"
                )
            if num_cached_tokens % bs or not 0 < num_cached_tokens <= num_tokens:
                raise InvalidAllocationError(
                    f"num_cached_tokens={num_cached_tokens} must be a positive multiple of "
                    f"block_size={bs} and at most num_tokens={num_tokens}"
                )
            hit = self._take_hit(seq, num_cached_tokens // bs)
            need -= len(hit)
            free -= sum(1 for b in hit if b.ref_cnt == 0)  # free hit blocks are not spare
        if need > free:
            return False
        if self._seqs.get(seq.seq_id) is not seq:
            self._register_seq(seq)
        if hit:
            pool.touch([b.block_id for b in hit])
            block_ids.extend(b.block_id for b in hit)
            seq._kv_committed = len(hit)
            seq._kv_link = hit[-1].serial
        if need > 0:
            block_ids += pool.allocate(need)
        return True

    def _register_seq(self, seq: KVSequence) -> None:
        other = self._seqs.setdefault(seq.seq_id, seq)
        if other is not seq:
            raise DuplicateSequenceError(f"seq_id {seq.seq_id!r} is already in use")
        seq._kv_committed = 0
        seq._kv_link = ROOT_LINK

    def commit(self, seq: KVSequence, num_computed_tokens: int) -> None:
        """The KV of the first ``num_computed_tokens`` tokens is written: full blocks among them
        become hittable (``BlockStored``). Cheap when no new block became full."""
        bs = self.block_size
        n_full = num_computed_tokens // bs
        start = seq._kv_committed
        if n_full <= start or not self.enable_prefix_caching:
            return
        tokens, block_ids, salt = seq.token_ids, seq.block_ids, seq.cache_salt
        if num_computed_tokens > len(tokens) or n_full > len(block_ids):
            raise InvalidAllocationError(
                f"num_computed_tokens={num_computed_tokens} exceeds the tokens "
                f"({len(tokens)}) or the allocated slots ({len(block_ids) * bs}) of "
                f"sequence {seq.seq_id!r}"
            )
        seq._kv_committed = n_full
        link = seq._kv_link
        if link == _NO_LINK:
            return
        hashes = seq.block_hashes
        if len(hashes) < n_full:
            extend_block_hashes(hashes, tokens, bs, n_full, salt, self._hash_fn)
        pool = self.pool
        stored: list[int] = []
        for i in range(start, n_full):
            block_tokens = tokens[i * bs : (i + 1) * bs]
            other = pool.cached.get(hashes[i])
            if other is None:  # new: this block becomes hittable
                link = pool.register(block_ids[i], hashes[i], link, block_tokens, salt)
                stored.append(i)
            elif other.parent == link and other.salt == salt and other.token_ids == block_tokens:
                link = other.serial  # the same KV is already cached in another block: chain on
            else:  # a hash collision: stop caching this sequence's later blocks
                link = _NO_LINK
                break
        seq._kv_link = link
        if stored and self._on_event is not None:
            self._emit_stored(seq, stored)

    def _emit_stored(self, seq: KVSequence, stored: list[int]) -> None:
        """One ``BlockStored`` per run of consecutive newly stored blocks."""
        assert self._on_event is not None
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        run_start = prev = stored[0]
        for i in [*stored[1:], -1]:
            if i == prev + 1:
                prev = i
                continue
            self._on_event(
                BlockStored(
                    block_hashes=tuple(hashes[run_start : prev + 1]),
                    parent_hash=hashes[run_start - 1] if run_start else None,
                    token_ids=tuple(tokens[run_start * bs : (prev + 1) * bs]),
                    block_size=bs,
                )
            )
            run_start = prev = i

    def free(self, seq: KVSequence) -> None:
        """Release ``seq``'s blocks (tail first), clear its block table, keep its hashes.

        Raises :class:`UnknownSequenceError` for a sequence this manager does not hold
        (never allocated, or already freed).
        """
        if self._seqs.get(seq.seq_id) is not seq:
            raise UnknownSequenceError(
                f"sequence {seq.seq_id!r} is not allocated here (unknown or already freed)"
            )
        del self._seqs[seq.seq_id]
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq._kv_committed = 0
        if self._pending is not None and self._pending[0] is seq:
            self._pending = None

    def fork(self, parent: KVSequence, child: KVSequence) -> list[tuple[int, int]]:
        """Give ``child`` ``parent``'s blocks: full ones shared (ref + 1), a partial tail copied.

        ``child`` must hold no blocks; its ``token_ids`` are set to a copy of the parent's when
        empty and must equal them otherwise. Returns the ``(src_block, dst_block)`` copies the
        caller must make in the KV tensors.
        """
        if self._seqs.get(parent.seq_id) is not parent:
            raise UnknownSequenceError(f"parent sequence {parent.seq_id!r} is not allocated here")
        if child.block_ids or child.seq_id in self._seqs:
            raise DuplicateSequenceError(
                f"child sequence {child.seq_id!r} is already allocated here; fork needs a new one"
            )
        if not child.token_ids:
            child.token_ids = list(parent.token_ids)
        elif child.token_ids != parent.token_ids:
            raise InvalidAllocationError(
                f"child {child.seq_id!r} token_ids differ from parent {parent.seq_id!r}'s"
            )
        bs = self.block_size
        num_tokens = len(parent.token_ids)
        full = min(num_tokens // bs, len(parent.block_ids))
        shared = parent.block_ids[:full]
        copies: list[tuple[int, int]] = []
        has_partial = num_tokens % bs != 0 and full < len(parent.block_ids)
        if has_partial and self.pool.num_free == 0:
            raise OutOfBlocksError(
                f"no free block to copy the partial tail of {parent.seq_id!r} for {child.seq_id!r}"
            )
        self._register_seq(child)
        self.pool.touch(shared)
        child.block_ids = list(shared)
        if has_partial:
            dst = self.pool.allocate(1)[0]
            child.block_ids.append(dst)
            copies.append((parent.block_ids[full], dst))
        child.cache_salt = parent.cache_salt
        child.block_hashes = parent.block_hashes[:full]
        child._kv_committed = min(parent._kv_committed, full)
        child._kv_link = (
            parent._kv_link if child._kv_committed == parent._kv_committed else _NO_LINK
        )
        return copies

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (``AllBlocksCleared``). False, changing nothing, while any
        block is held by a live sequence."""
        if not self.pool.reset():
            return False
        self._pending = None
        return True
