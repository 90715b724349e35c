"""BlockPool: the fixed set of KV blocks, their ref counts, the free list and the prefix cache.

Every block is a :class:`KVBlock` object created once. The free blocks are linked into an
intrusive doubly linked list through the blocks themselves (with a sentinel), so taking the head,
appending, and unlinking a block hit in the cache are O(1) and allocate nothing. The head is the
next block to reuse: freed blocks that hold no cached KV are pushed at the head, cached ones
appended at the tail, so cached KV is evicted lazily, least recently freed first.

A cached block keeps its hash, its tokens, a unique registration ``serial`` and its ``parent``
link (the serial of the cached block before it, or :data:`ROOT_LINK`). ``cached`` maps each hash
to its block. A hit is accepted only when the block's tokens and salt equal the sequence's and
its parent link is the block just matched, so by induction the whole prefix is verified and a
hash collision can never return wrong KV. The pool imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Final

from servekit.errors import ServekitError
from servekit.kv.events import AllBlocksCleared, BlockRemoved, KVEvent

ROOT_LINK: Final = -1
"""Parent link of a sequence's first block."""
NO_HASH: Final = -1
"""``block_hash`` of a block that holds no cached KV (hashes are non-negative)."""
NO_SERIAL: Final = -2
"""``serial`` of a block that holds no cached KV."""


class KVCacheError(ServekitError):
    """Base class of the KV cache's errors."""


class InvalidBlockSizeError(KVCacheError, ValueError):
    """``block_size`` is not a positive power of two (or ``num_blocks`` is not positive)."""


class DoubleFreeError(KVCacheError, ValueError):
    """A block was freed more often than it was taken."""


class OutOfBlocksError(KVCacheError, RuntimeError):
    """More blocks were asked for than the pool has (free, or at all)."""


class KVBlock:
    """One KV block: its id, ref count, free-list links and, while cached, what it holds."""

    __slots__ = (
        "block_hash",
        "block_id",
        "next_free",
        "parent",
        "prev_free",
        "ref_cnt",
        "salt",
        "serial",
        "token_ids",
    )

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0  # sequences holding the block; 0 when it is on the free list
        self.prev_free = self.next_free = self  # free-list links (a lone block is its own ring)
        self.block_hash = NO_HASH
        self.serial = NO_SERIAL
        self.parent = ROOT_LINK
        self.salt: str | None = None
        self.token_ids: list[int] | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Fixed pool of ``num_blocks`` KV blocks of ``block_size`` tokens with a prefix cache.

    The manager (:class:`servekit.kv.manager.KVCacheManager`) drives it; it can also be used on
    its own. Blocks are named by their ids (``0 .. num_blocks - 1``), the indices into
    :attr:`blocks` and into the KV tensors.
    """

    __slots__ = ("_head", "_next_serial", "_on_event", "block_size", "blocks", "cached",
                 "num_blocks", "num_free")

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        on_event: Callable[[KVEvent], None] | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise InvalidBlockSizeError(f"block_size must be a power of two, got {block_size!r}")
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise InvalidBlockSizeError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._on_event = on_event
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # The sentinel closes the free list into a ring: its next_free is the head (reused
        # first), its prev_free the tail. Initially every block is free, in id order.
        self._head = head = KVBlock(num_blocks)
        ring = [head, *self.blocks, head]
        for a, b in pairwise(ring):
            a.next_free = b
            b.prev_free = a
        self.num_free = num_blocks
        self.cached: dict[int, KVBlock] = {}  # hash -> the block holding that KV
        self._next_serial = 0

    # -- free list -------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks off the head of the free list (ref 1), evicting cached ones."""
        if n > self.num_free:
            raise OutOfBlocksError(f"{n} blocks asked for, {self.num_free} free")
        head, cached = self._head, self.cached
        taken: list[int] = []
        removed: list[int] = []
        b = head.next_free
        for _ in range(n):
            b.ref_cnt = 1
            taken.append(b.block_id)
            if b.block_hash != NO_HASH:  # evict its cached KV
                removed.append(b.block_hash)
                del cached[b.block_hash]
                b.block_hash, b.serial, b.salt, b.token_ids = NO_HASH, NO_SERIAL, None, None
            b = b.next_free
        head.next_free = b
        b.prev_free = head
        self.num_free -= n
        if removed and self._on_event is not None:
            self._on_event(BlockRemoved(tuple(removed)))
        return taken

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (cache hits), unlinking free ones."""
        blocks = self.blocks
        for i in block_ids:
            b = blocks[i]
            if b.ref_cnt == 0:
                p, q = b.prev_free, b.next_free
                p.next_free = q
                q.prev_free = p
                self.num_free -= 1
            b.ref_cnt += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; release them tail first.

        A block whose last reference goes joins the free list: at the tail when it holds cached
        KV (evicted last, least recently freed first), at the head otherwise (reused first).
        Going tail first makes a sequence's first blocks the last of its blocks to be evicted.
        A block freed once too often raises :class:`DoubleFreeError` after the blocks before it
        (in that order) were released.
        """
        blocks, head = self.blocks, self._head
        for i in reversed(block_ids):
            b = blocks[i]
            if b.ref_cnt > 1:
                b.ref_cnt -= 1
                continue
            if b.ref_cnt < 1:
                raise DoubleFreeError(f"block {i} freed more often than it was taken")
            b.ref_cnt = 0
            if b.block_hash != NO_HASH:  # append after the tail
                p, q = head.prev_free, head
            else:  # push at the head
                p, q = head, head.next_free
            p.next_free = q.prev_free = b
            b.prev_free, b.next_free = p, q
            self.num_free += 1

    def free_block_ids(self) -> list[int]:
        """The free blocks in reuse order (head first). O(num_free); for tests and tools."""
        out = []
        b = self._head.next_free
        while b is not self._head:
            out.append(b.block_id)
            b = b.next_free
        return out

    # -- prefix cache ----------------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        """Blocks whose KV is hittable (held or free)."""
        return len(self.cached)

    def lookup(self, block_hash: int) -> int:
        """The id of the block cached under ``block_hash``, or -1."""
        b = self.cached.get(block_hash)
        return -1 if b is None else b.block_id

    def cached_blocks(self) -> dict[int, int]:
        """``{hash: block id}`` of every cached block."""
        return {h: b.block_id for h, b in self.cached.items()}

    def register(self, block_id: int, block_hash: int, parent_link: int,
                 token_ids: list[int], salt: str | None = None) -> int:
        """Make a block hittable under ``block_hash``; returns its serial (its children's link).

        ``block_hash`` must not be cached yet. ``parent_link`` is the serial of the cached block
        before it, or :data:`ROOT_LINK` for a sequence's first block; ``token_ids`` and ``salt``
        are what a hit must match.
        """
        b = self.blocks[block_id]
        b.serial = s = self._next_serial
        self._next_serial = s + 1
        b.block_hash, b.parent, b.token_ids, b.salt = block_hash, parent_link, token_ids, salt
        self.cached[block_hash] = b
        return s

    def reset(self) -> bool:
        """Drop every cached hash (``AllBlocksCleared``); False, changing nothing, if any block
        is held."""
        if self.num_free != self.num_blocks:
            return False
        for b in self.cached.values():
            b.block_hash, b.serial, b.salt, b.token_ids = NO_HASH, NO_SERIAL, None, None
        self.cached.clear()
        if self._on_event is not None:
            self._on_event(AllBlocksCleared())
        return True

    # -- snapshots by block id, for tests and tools (O(num_blocks) each) -------------------

    @property
    def ref(self) -> list[int]:
        """Each block's ref count."""
        return [b.ref_cnt for b in self.blocks]

    @property
    def hashes(self) -> list[int]:
        """Each block's cached hash, or :data:`NO_HASH`."""
        return [b.block_hash for b in self.blocks]

    @property
    def tokens(self) -> list[list[int] | None]:
        """Each block's cached tokens (None when it holds no cached KV)."""
        return [b.token_ids for b in self.blocks]

    @property
    def prev(self) -> list[int]:
        """Each free block's predecessor on the free list, then the sentinel's (the tail);
        the sentinel is id ``num_blocks``. Entries of held blocks are stale."""
        return [b.prev_free.block_id for b in (*self.blocks, self._head)]
