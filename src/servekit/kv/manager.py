"""KVCacheManager: the sequence-level API the scheduler calls (see docs/contracts.md).

One sequence's life: ``get_num_cached_tokens`` (prefix hit, in tokens) -> ``allocate`` (blocks for
the tokens to compute, hit blocks shared) -> the model writes KV -> ``commit`` (full written
blocks become hittable) -> ``allocate`` again as it grows -> ``free`` (blocks back to the pool,
still hittable until reused). ``fork`` shares a sequence's blocks with a child (parallel
sampling). Block hashes are computed once per sequence and kept across ``free``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

import numpy as np
import xxhash

from servekit.kv.blocks import (
    NO_HASH,
    ROOT_LINK,
    SALTED_ROOT_LINK,
    BlockPool,
    KVCacheError,
)
from servekit.kv.events import BlockStored, KVEvent

try:
    from servekit.kv import _cpool
except ImportError:  # not built: only used where pool.speedups is True (see blocks.py)
    _cpool = None  # type: ignore[assignment]
from servekit.kv.hashing import (
    BlockHashFn,
    _xxhash_fn,
    extend_block_hashes,
    extend_block_hashes_packed,
    get_hash_fn,
    pack_tokens,
)

__all__ = [
    "DuplicateSequenceError",
    "InvalidAllocationError",
    "KVCacheManager",
    "KVSequence",
    "OutOfBlocksError",
    "UnknownSequenceError",
]

_NO_LINK: Final = -4  # a sequence whose commits stopped at a hash collision
# The C core calls the default hash function's xxh3 directly and masks the result itself.
_XXH3: Final = xxhash.xxh3_64_intdigest


class _HitMemo(NamedTuple):
    """A verified hit: the tokens of its blocks, the blocks, their serials and hashes."""

    tokens: list[int]
    blocks: list[int]
    serials: list[int]
    hashes: list[int]
    salt: str | None
    hash_fn: BlockHashFn


class UnknownSequenceError(KVCacheError, KeyError):
    """The sequence holds nothing in this manager (never allocated, or already freed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateSequenceError(KVCacheError, ValueError):
    """Another live sequence object already uses this ``seq_id``."""


class InvalidAllocationError(KVCacheError, ValueError):
    """An allocate/commit/fork argument is inconsistent with the sequence (message names it)."""


class OutOfBlocksError(KVCacheError, RuntimeError):
    """The pool can never hold the request (more blocks than it has), or fork found no free
    block for the copy of the parent's partial tail."""


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
    ``speedups`` selects the C core as for :class:`~servekit.kv.blocks.BlockPool` (it also runs
    the per-block loops of ``commit`` and of the prefix lookup).
    """

    __slots__ = (
        "_hash_fn",
        "_memo",
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
        speedups: bool | None = None,
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size, on_event=on_event, speedups=speedups)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = get_hash_fn(hash_algorithm)
        self._on_event = on_event
        self._seqs: dict[str, KVSequence] = {}
        # The hit found by the last get_num_cached_tokens: (seq, blocks, their serials).
        self._pending: tuple[KVSequence, list[int], list[int]] | None = None
        # The last verified hit, to skip re-hashing and re-verifying a prefix shared with the
        # next lookup (a common system prompt): see _memo_prefix.
        self._memo: _HitMemo | None = None
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

    def _ensure_hashes(self, seq: KVSequence, num_full: int) -> list[int]:
        hashes = seq.block_hashes
        if len(hashes) < num_full:
            fn = self._hash_fn
            if self.pool.speedups:  # packs and hashes straight from the token list
                raw = fn is _xxhash_fn
                _cpool.extend_hashes(seq.token_ids, hashes, num_full, self.block_size,
                                     seq.cache_salt, _XXH3 if raw else fn, raw)
            else:
                extend_block_hashes(
                    hashes, seq.token_ids, self.block_size, num_full, seq.cache_salt, fn
                )
        return hashes

    def _find_hit(self, seq: KVSequence) -> tuple[list[int], list[int]]:
        """Longest verified cached prefix (blocks, serials), leaving the last token out."""
        bs = self.block_size
        token_ids = seq.token_ids
        max_blocks = (len(token_ids) - 1) // bs
        if max_blocks <= 0:
            return [], []
        pool = self.pool
        salt = seq.cache_salt
        memo = self._memo
        if memo is not None and memo.salt == salt and memo.hash_fn is self._hash_fn:
            blocks, serials = self._memo_prefix(seq, memo, max_blocks)
        else:
            blocks, serials = [], []
        start = len(blocks)
        hashes = self._ensure_hashes(seq, max_blocks)
        keys, values, mask = pool.keys, pool.values, len(pool.keys) - 1
        parent, serial = pool.parent, pool.serial
        link = serials[-1] if serials else ROOT_LINK if salt is None else SALTED_ROOT_LINK
        if pool.speedups:  # the probe and the token check of the blocks found
            _cpool.find_hit(keys, values, parent, serial, pool.token_bytes, token_ids, hashes,
                            start, max_blocks, link, salt, pool._salts, blocks, serials)
            n = len(blocks)
        else:
            for i in range(start, max_blocks):
                h = hashes[i]
                j = h & mask  # inlined pool.lookup(h)
                while (k := keys[j]) != h and k != NO_HASH:
                    j = (j + 1) & mask
                if k == NO_HASH:
                    break
                b = values[j]
                if parent[b] != link:
                    break
                if i == 0 and salt is not None and not pool.root_salt_matches(b, salt):
                    break
                link = serial[b]
                blocks.append(b)
                serials.append(link)
            n = len(blocks)
            if n > start:  # verify the blocks the memo did not vouch for
                want = np.frombuffer(
                    pack_tokens(token_ids[start * bs : n * bs]), dtype="<i4"
                ).reshape(n - start, bs)
                ok = (pool.tokens[blocks[start:]] == want).all(axis=1)
                if not ok.all():
                    n = start + int(ok.argmin())
                    del blocks[n:], serials[n:]
        if n > start:
            self._memo = _HitMemo(token_ids[: n * bs], blocks[:], serials[:], hashes[:n], salt,
                                  self._hash_fn)
        return blocks, serials

    def _memo_prefix(
        self, seq: KVSequence, memo: _HitMemo, max_blocks: int
    ) -> tuple[list[int], list[int]]:
        """The blocks of the last verified hit that ``seq`` shares, still cached.

        Equal tokens (one list comparison in C, then a binary search when they differ) and an
        unchanged serial (the block was neither evicted nor re-registered) mean the block was
        verified for exactly these tokens: no hashing, probing or token check is needed. The
        shared blocks' hashes are copied into ``seq.block_hashes``.
        """
        bs = self.block_size
        tokens, mtokens = seq.token_ids, memo.tokens
        k = min(max_blocks, len(memo.blocks))
        if not k or tokens[:bs] != mtokens[:bs]:
            return [], []
        if tokens[: k * bs] != mtokens[: k * bs]:
            lo, hi = 1, k - 1  # the first block is equal, block k - 1 somewhere differs
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if tokens[: mid * bs] == mtokens[: mid * bs]:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        blocks, serials = memo.blocks[:k], memo.serials[:k]
        now = list(map(self.pool.serial.__getitem__, blocks))
        if now != serials:
            k = next(i for i, (a, b) in enumerate(zip(now, serials, strict=True)) if a != b)
            del blocks[k:], serials[k:]
        hashes = seq.block_hashes
        if len(hashes) < k:
            hashes.extend(memo.hashes[len(hashes) : k])
        return blocks, serials

    def get_num_cached_tokens(self, seq: KVSequence) -> int:
        """Longest verified prefix-cache hit for ``seq`` (which holds no blocks), in tokens.

        A multiple of ``block_size`` and always below ``len(seq.token_ids)``: the last token is
        always computed. Allocates nothing; counts the query and the hit. Call it right before
        ``allocate`` for the same sequence.
        """
        num_tokens = len(seq.token_ids)
        self.prefix_queries += num_tokens
        if not self.enable_prefix_caching or seq.block_ids:
            self._pending = None
            return 0
        blocks, serials = self._find_hit(seq)
        self._pending = (seq, blocks, serials)
        hit = len(blocks) * self.block_size
        self.prefix_hits += hit
        return hit

    def _take_hit(self, seq: KVSequence, num_hit_blocks: int) -> list[int]:
        pending = self._pending
        self._pending = None
        if pending is not None and pending[0] is seq and len(pending[1]) >= num_hit_blocks:
            blocks, serials = pending[1][:num_hit_blocks], pending[2][:num_hit_blocks]
            if list(map(self.pool.serial.__getitem__, blocks)) == serials:
                return blocks
        blocks = self._find_hit(seq)[0][:num_hit_blocks]  # the cache changed since the lookup
        if len(blocks) < num_hit_blocks:
            raise InvalidAllocationError(
                f"num_cached_tokens={num_hit_blocks * self.block_size} exceeds the current prefix "
                f"hit of sequence {seq.seq_id!r} ({len(blocks) * self.block_size} tokens); call "
                "get_num_cached_tokens right before allocate"
            )
        return blocks

    # -- allocate / commit / free ----------------------------------------------------------

    def allocate(self, seq: KVSequence, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make ``seq.block_ids`` cover its first ``num_tokens`` tokens (a total, not new ones).

        For a sequence holding no blocks, its first ``num_cached_tokens // block_size`` blocks
        are the hit just returned by :meth:`get_num_cached_tokens`. All or nothing: returns False
        with nothing changed when not enough blocks are free.
        """
        block_ids = seq.block_ids
        need = -(-num_tokens // self.block_size) - len(block_ids)
        if not num_cached_tokens:  # growth, or a sequence without a hit: the fast path
            pool = self.pool
            if need > pool.num_free:
                if len(block_ids) + need > self.num_blocks:
                    raise OutOfBlocksError(
                        f"sequence {seq.seq_id!r} needs {len(block_ids) + need} blocks for "
                        f"num_tokens={num_tokens}; the pool has {self.num_blocks}"
                    )
                return False
            if self._seqs.get(seq.seq_id) is not seq:
                self._register_seq(seq)
            if need > 0:
                block_ids += pool.allocate(need)
            return True
        return self._allocate_with_hit(seq, num_tokens, num_cached_tokens, need)

    def _allocate_with_hit(
        self, seq: KVSequence, num_tokens: int, num_cached_tokens: int, need: int
    ) -> bool:
        block_ids = seq.block_ids
        bs = self.block_size
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
        total = len(hit) + max(need, 0)
        if total > self.num_blocks:
            raise OutOfBlocksError(
                f"sequence {seq.seq_id!r} needs {total} blocks for num_tokens={num_tokens}; "
                f"the pool has {self.num_blocks}"
            )
        pool = self.pool
        if need > 0:
            ref = pool.ref
            hit_free = sum(1 for b in hit if ref[b] == 0)
            if need > pool.num_free - hit_free:
                return False
        if self._seqs.get(seq.seq_id) is not seq:
            self._register_seq(seq)
        pool.touch(hit)
        block_ids.extend(hit)
        seq._kv_committed = len(hit)
        seq._kv_link = pool.serial[hit[-1]]
        if need > 0:
            block_ids.extend(pool.allocate(need))
        return True

    def _register_seq(self, seq: KVSequence) -> None:
        other = self._seqs.setdefault(seq.seq_id, seq)
        if other is not seq:
            raise DuplicateSequenceError(f"seq_id {seq.seq_id!r} is already in use")
        seq._kv_committed = 0
        seq._kv_link = ROOT_LINK if seq.cache_salt is None else SALTED_ROOT_LINK

    def commit(self, seq: KVSequence, num_computed_tokens: int) -> None:
        """The KV of the first ``num_computed_tokens`` tokens is written: full blocks among them
        become hittable (``BlockStored``). Cheap when no new block became full, and about a
        microsecond per newly full block otherwise."""
        bs = self.block_size
        n_full = num_computed_tokens // bs
        start = seq._kv_committed
        if n_full <= start or not self.enable_prefix_caching:
            return
        token_ids, block_ids = seq.token_ids, seq.block_ids
        if num_computed_tokens > len(token_ids) or n_full > len(block_ids):
            raise InvalidAllocationError(
                f"num_computed_tokens={num_computed_tokens} exceeds the tokens "
                f"({len(token_ids)}) or the allocated slots ({len(block_ids) * bs}) of "
                f"sequence {seq.seq_id!r}"
            )
        seq._kv_committed = n_full
        link = seq._kv_link
        if link == _NO_LINK:
            return
        pool = self.pool
        stored: list[int] | None = [] if self._on_event is not None else None
        if pool.speedups:  # all of the below in one call, from the token list itself
            s0 = pool._next_serial
            fn = self._hash_fn
            raw = fn is _xxhash_fn
            link, s = _cpool.commit(
                pool.keys, pool.values, pool.parent, pool.serial, pool.hashes, pool.token_bytes,
                token_ids, seq.block_hashes, block_ids, start, n_full, link, s0,
                seq.cache_salt, pool._salts, _XXH3 if raw else fn, raw, stored,
            )
        else:
            # The tokens of the new full blocks, packed once: hashed (when not hashed yet) and
            # stored as the blocks' raw bytes.
            data = pack_tokens(token_ids[start * bs : n_full * bs])
            hashes = seq.block_hashes
            if len(hashes) < n_full:
                if len(hashes) < start:
                    self._ensure_hashes(seq, start)
                extend_block_hashes_packed(hashes, data, start, bs, seq.cache_salt, self._hash_fn)
            # One pass per block: look it up, then register it (inlined pool.register) and
            # store its tokens, or chain onto an identical cached block.
            s0 = s = pool._next_serial
            rb = 4 * bs
            keys, values, mask = pool.keys, pool.values, len(pool.keys) - 1
            parent, serial = pool.parent, pool.serial
            block_hash, tok = pool.hashes, pool.token_bytes
            o = -rb
            for i in range(start, n_full):
                o += rb
                h = hashes[i]
                j = h & mask  # inlined pool.lookup(h)
                while (k := keys[j]) != h and k != NO_HASH:
                    j = (j + 1) & mask
                if k == NO_HASH:  # new: register block_ids[i] in the empty slot j
                    b = block_ids[i]
                    block_hash[b] = h
                    serial[b] = s
                    parent[b] = link
                    if link == SALTED_ROOT_LINK:
                        pool.set_root_salt(b, seq.cache_salt)
                    keys[j] = h
                    values[j] = b
                    b *= rb
                    tok[b : b + rb] = data[o : o + rb]
                    link = s
                    s += 1
                    if stored is not None:
                        stored.append(i)
                    continue
                other = values[j]
                if (
                    parent[other] == link
                    and (
                        link != SALTED_ROOT_LINK or pool.root_salt_matches(other, seq.cache_salt)
                    )
                    and tok[other * rb : other * rb + rb] == data[o : o + rb]
                ):
                    link = serial[other]  # same KV already cached in another block: chain on
                else:  # a hash collision: stop caching this sequence's later blocks
                    link = _NO_LINK
                    break
        pool._next_serial = s
        pool.num_cached += s - s0
        seq._kv_link = link
        if stored:
            self._emit_stored(seq, stored)

    def _emit_stored(self, seq: KVSequence, stored: list[int]) -> None:
        assert self._on_event is not None
        bs, hashes, toks = self.block_size, seq.block_hashes, seq.token_ids
        run_start = prev = stored[0]
        for i in [*stored[1:], -1]:
            if i == prev + 1:
                prev = i
                continue
            self._on_event(
                BlockStored(
                    block_hashes=tuple(hashes[run_start : prev + 1]),
                    parent_hash=hashes[run_start - 1] if run_start else None,
                    token_ids=tuple(toks[run_start * bs : (prev + 1) * bs]),
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
        self._memo = None
        return True
