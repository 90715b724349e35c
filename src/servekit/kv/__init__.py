"""servekit.kv: the paged KV cache core.

:class:`KVCacheManager` (sequence-level allocate / commit / free / fork with a verified prefix
cache) over :class:`BlockPool` (blocks, ref counts, O(1) free list, lazy eviction), chained block
hashes, and KV events. The KV tensors and batch builders live in :mod:`servekit.kv.cache`
(imported on demand: this package imports no torch).
"""

from servekit.kv.blocks import (
    BlockPool,
    DoubleFreeError,
    InvalidBlockSizeError,
    KVCacheError,
    speedups_available,
)
from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from servekit.kv.hashing import UnknownHashAlgorithmError, hash_block
from servekit.kv.manager import (
    DuplicateSequenceError,
    InvalidAllocationError,
    KVCacheManager,
    KVSequence,
    OutOfBlocksError,
    UnknownSequenceError,
)

__all__ = [
    "AllBlocksCleared",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "DoubleFreeError",
    "DuplicateSequenceError",
    "InvalidAllocationError",
    "InvalidBlockSizeError",
    "KVCacheError",
    "KVCacheManager",
    "KVEvent",
    "KVSequence",
    "OutOfBlocksError",
    "UnknownHashAlgorithmError",
    "UnknownSequenceError",
    "hash_block",
    "speedups_available",
]
