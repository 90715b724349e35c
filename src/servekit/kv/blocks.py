"""BlockPool: the fixed set of KV blocks, their ref counts, the free list and the prefix cache.

Every block lives in flat arrays created once (no per-block Python object):

* ``prev``/``next`` (int32) link the free blocks into an intrusive doubly linked list with a
  sentinel, so taking the head, appending, and unlinking a block hit in the cache are O(1) and
  allocate nothing. The head is the next block to reuse: freed blocks that hold no cached KV are
  pushed at the head, cached ones appended at the tail, so cached KV is evicted lazily, least
  recently freed first.
* ``ref`` (int32) counts the sequences holding a block; a free block has ref 0.
* a cached block keeps its hash (``hashes``), its tokens (``tokens``, int32 ``[n, block_size]``),
  a unique registration ``serial`` and its ``parent`` link (the serial of the cached block before
  it, or a root marker). A hit is accepted only when the block's tokens equal the sequence's and
  its parent link is the block just matched, so by induction the whole prefix is verified and a
  hash collision can never return wrong KV.

The hash -> block index is an open-addressing table (linear probing, backward-shift deletion) in
two flat arrays sized once to at least twice the pool, so the whole pool costs a fixed ~125 bytes
per block (block_size 16) whether its blocks are cached or not, and nothing is allocated per
block. The pool imports no torch.

The per-block loops (``allocate``, ``free``, ``touch``, and the manager's ``commit`` and hit
probe) run in the optional C extension :mod:`servekit.kv._cpool` when it is built
(``speedups``); the pure-Python loops below are the always-available fallback and the spec the
C code mirrors exactly.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from servekit._speedups import resolve_speedups
from servekit.errors import ServekitError
from servekit.kv.events import AllBlocksCleared, BlockRemoved, KVEvent

try:
    from servekit.kv import _cpool
except ImportError:  # not built (no compiler at install time): the pure-Python loops only
    _cpool = None  # type: ignore[assignment]  # only used where BlockPool.speedups is True

ROOT_LINK: Final = -1
"""Parent link of a sequence's first block without a cache salt."""
SALTED_ROOT_LINK: Final = -3
"""Parent link of a salted first block (its salt is kept and compared on a hit)."""
_NO_SERIAL: Final = -2
NO_HASH: Final = -1
"""``hashes[b]`` of a block that holds no cached KV (hashes are non-negative)."""


class KVCacheError(ServekitError):
    """Base class of the KV cache's errors."""


class InvalidBlockSizeError(KVCacheError, ValueError):
    """``block_size`` is not a positive power of two (or ``num_blocks`` is not positive)."""


class DoubleFreeError(KVCacheError, ValueError):
    """A block was freed more often than it was taken."""


def speedups_available() -> bool:
    """Whether the optional C core :mod:`servekit.kv._cpool` is built and importable."""
    return _cpool is not None


class BlockPool:
    """Fixed pool of ``num_blocks`` KV blocks of ``block_size`` tokens with a prefix cache.

    The manager (:class:`servekit.kv.manager.KVCacheManager`) drives it; it can also be used on
    its own. Methods trust their arguments on the hot path (block ids in range, ``n`` no more
    than :attr:`num_free`); callers check capacity with :attr:`num_free` first (the C core
    range-checks ids and raises ``IndexError`` rather than touch memory out of bounds).

    ``speedups``: None (default) runs the per-block loops in the C core when it is built, unless
    the environment variable ``SERVEKIT_NO_SPEEDUPS`` is set (to anything but ``0``); True
    requires it (``ImportError`` otherwise); False uses the pure-Python loops. The attribute
    :attr:`speedups` says which is in use.
    """

    __slots__ = (
        "_mask",
        "_next_serial",
        "_on_event",
        "_salts",
        "block_size",
        "hashes",
        "keys",
        "next",
        "num_blocks",
        "num_cached",
        "num_free",
        "parent",
        "prev",
        "ref",
        "serial",
        "speedups",
        "token_bytes",
        "tokens",
        "values",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        on_event: Callable[[KVEvent], None] | None = None,
        speedups: bool | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise InvalidBlockSizeError(f"block_size must be a power of two, got {block_size!r}")
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise InvalidBlockSizeError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.speedups: bool = resolve_speedups(speedups, _cpool, "servekit.kv._cpool")
        n = num_blocks
        self.num_blocks: int = n
        self.block_size: int = block_size
        self._on_event = on_event
        # Free list over ids 0..n-1 with sentinel n, initially in id order.
        self.next: array[int] = array("i", range(1, n + 2))
        self.next[n] = 0
        self.prev: array[int] = array("i", range(-1, n))
        self.prev[0] = n
        self.num_free: int = n
        self.ref: array[int] = array("i", bytes(4 * n))
        self.hashes: array[int] = array("q", [NO_HASH]) * n
        self.serial: array[int] = array("q", [_NO_SERIAL]) * n
        self.parent: array[int] = array("q", bytes(8 * n))
        self.tokens: npt.NDArray[np.int32] = np.zeros((n, block_size), dtype=np.int32)
        # the same rows as raw bytes (little-endian hosts): block b is
        # token_bytes[b * 4 * block_size : (b + 1) * 4 * block_size], the
        # little-endian int32 layout that is hashed, so a commit stores and compares a block's
        # tokens with one slice operation and no numpy call
        self.token_bytes: memoryview = self.tokens.data.cast("B")
        # hash -> block: open addressing over `keys` (NO_HASH = empty) and `values`
        capacity = 1 << (2 * n - 1).bit_length()
        self._mask = capacity - 1
        self.keys: array[int] = array("q", [NO_HASH]) * capacity
        self.values: array[int] = array("i", bytes(4 * capacity))
        self.num_cached = 0
        self._salts: dict[int, str] = {}
        self._next_serial = 0

    # -- free list -------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks off the head of the free list (ref 1), evicting cached ones.

        The caller guarantees ``n <= num_free``.
        """
        removed: list[int] | None = [] if self._on_event is not None else None
        if self.speedups:
            taken, evicted = _cpool.allocate(
                self.next, self.prev, self.ref, self.hashes, self.serial, self.keys,
                self.values, n, removed,
            )
            self.num_cached -= evicted
            self._allocated(taken, evicted, removed)
            return taken
        nxt, ref, hashes = self.next, self.ref, self.hashes
        sentinel = self.num_blocks
        out: list[int] = []
        evicted = 0
        b = nxt[sentinel]
        for _ in range(n):
            ref[b] = 1
            out.append(b)
            h = hashes[b]
            if h != NO_HASH:  # evict its cached KV
                self._delete(h)
                hashes[b] = NO_HASH
                self.serial[b] = _NO_SERIAL
                evicted += 1
                if removed is not None:
                    removed.append(h)
            b = nxt[b]
        nxt[sentinel] = b
        self.prev[b] = sentinel
        self._allocated(out, evicted, removed)
        return out

    def _allocated(self, taken: list[int], evicted: int, removed: list[int] | None) -> None:
        """Account ``taken`` blocks, ``evicted`` of them dropped from the prefix cache (and its
        ``num_cached``) with the hashes ``removed`` (None when no one listens to events)."""
        self.num_free -= len(taken)
        if evicted:
            if self._salts:
                for b in taken:
                    self._salts.pop(b, None)
            if removed:
                assert self._on_event is not None
                self._on_event(BlockRemoved(tuple(removed)))

    def touch(self, blocks: Sequence[int]) -> None:
        """Take one more reference on each of ``blocks`` (cache hits), unlinking free ones."""
        if self.speedups:
            self.num_free -= _cpool.touch(self.next, self.prev, self.ref, blocks)
            return
        nxt, prv, ref = self.next, self.prev, self.ref
        for b in blocks:
            r = ref[b]
            if r == 0:
                p, q = prv[b], nxt[b]
                nxt[p] = q
                prv[q] = p
                self.num_free -= 1
            ref[b] = r + 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each of ``blocks``; release them tail first.

        A block whose last reference goes joins the free list: at the tail when it holds cached
        KV (evicted last, least recently freed first), at the head otherwise (reused first).
        Iterating tail first makes a sequence's head blocks the last of its blocks to be evicted.
        A block freed once too often raises :class:`DoubleFreeError` after the blocks before it
        (in that order) were released.
        """
        if self.speedups:
            released, failed = _cpool.free(self.next, self.prev, self.ref, self.hashes, blocks)
            self.num_free += released
            if failed >= 0:
                raise DoubleFreeError(f"block {blocks[failed]} freed more often than it was taken")
            return
        nxt, prv, ref, hashes = self.next, self.prev, self.ref, self.hashes
        sentinel = self.num_blocks
        tail = prv[sentinel]
        uncached: list[int] = []
        released = len(blocks)  # minus the blocks still shared, and those not reached
        error: DoubleFreeError | None = None
        for i, b in enumerate(reversed(blocks)):
            r = ref[b]
            if r == 1:
                ref[b] = 0
                if hashes[b] != NO_HASH:  # link after the tail
                    nxt[tail] = b
                    prv[b] = tail
                    tail = b
                else:
                    uncached.append(b)
            elif r > 1:
                ref[b] = r - 1
                released -= 1
            else:
                error = DoubleFreeError(f"block {b} freed more often than it was taken")
                released -= len(blocks) - i
                break
        nxt[tail] = sentinel
        prv[sentinel] = tail
        for b in uncached:  # push at the head
            first = nxt[sentinel]
            prv[first] = b
            nxt[b] = first
            prv[b] = sentinel
            nxt[sentinel] = b
        self.num_free += released
        if error is not None:
            raise error

    def free_block_ids(self) -> list[int]:
        """The free blocks in reuse order (head first). O(num_free); for tests and tools."""
        nxt, sentinel = self.next, self.num_blocks
        out = []
        b = nxt[sentinel]
        while b != sentinel:
            out.append(b)
            b = nxt[b]
        return out

    # -- prefix cache ----------------------------------------------------------------------

    def lookup(self, block_hash: int) -> int:
        """The block cached under ``block_hash``, or -1."""
        keys, mask = self.keys, self._mask
        i = block_hash & mask
        while True:
            k = keys[i]
            if k == block_hash:
                return self.values[i]
            if k == NO_HASH:
                return -1
            i = (i + 1) & mask

    def cached_blocks(self) -> dict[int, int]:
        """``{hash: block}`` of every cached block. O(capacity); for tests and tools."""
        return {k: v for k, v in zip(self.keys, self.values, strict=True) if k != NO_HASH}

    def _insert(self, block_hash: int, block: int) -> None:
        """Index ``block`` under ``block_hash`` (not indexed yet) and count it cached."""
        keys, mask = self.keys, self._mask
        i = block_hash & mask
        while keys[i] != NO_HASH:
            i = (i + 1) & mask
        keys[i] = block_hash
        self.values[i] = block
        self.num_cached += 1

    def _delete(self, block_hash: int) -> None:
        """Drop ``block_hash`` (indexed) from the index and the cached count."""
        keys, values, mask = self.keys, self.values, self._mask
        i = block_hash & mask
        while keys[i] != block_hash:
            i = (i + 1) & mask
        # backward-shift deletion: pull later entries of the probe run into the hole
        j = i
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == NO_HASH:
                break
            home = k & mask
            if (home <= i < j) or (i < j < home) or (j < home <= i):
                keys[i] = k
                values[i] = values[j]
                i = j
        keys[i] = NO_HASH
        self.num_cached -= 1

    def register(
        self, block: int, block_hash: int, parent_link: int, salt: str | None = None
    ) -> int:
        """Make ``block`` hittable under ``block_hash``; returns its serial (its children's link).

        ``block_hash`` must be non-negative and not cached yet, and ``block`` must hold no hash.
        ``parent_link`` is the serial of the cached block before it, or :data:`ROOT_LINK` /
        :data:`SALTED_ROOT_LINK` (with ``salt``) for a sequence's first block. The caller stores
        the block's tokens in ``tokens[block]`` (see :meth:`set_tokens`) before the next lookup.
        """
        s = self._next_serial
        self._next_serial = s + 1
        self.hashes[block] = block_hash
        self.serial[block] = s
        self.parent[block] = parent_link
        if salt is not None:
            self._salts[block] = salt
        self._insert(block_hash, block)
        return s

    def set_tokens(self, blocks: Sequence[int], rows: npt.NDArray[np.int32]) -> None:
        """Store the token ids ``rows`` (``[len(blocks), block_size]``) of registered blocks."""
        self.tokens[blocks] = rows

    def set_root_salt(self, block: int, salt: str | None) -> None:
        """Record the salt of a first block registered with ``SALTED_ROOT_LINK``."""
        if salt is not None:
            self._salts[block] = salt

    def root_salt_matches(self, block: int, salt: str | None) -> bool:
        """Whether a first block cached with ``SALTED_ROOT_LINK`` carries ``salt``."""
        return self._salts.get(block) == salt

    def reset(self) -> bool:
        """Drop every cached hash (``AllBlocksCleared``); False, changing nothing, if any block
        is held."""
        if self.num_free != self.num_blocks:
            return False
        self._salts.clear()
        self.keys = array("q", [NO_HASH]) * len(self.keys)
        self.num_cached = 0
        self.hashes = array("q", [NO_HASH]) * self.num_blocks
        self.serial = array("q", [_NO_SERIAL]) * self.num_blocks
        if self._on_event is not None:
            self._on_event(AllBlocksCleared())
        return True
