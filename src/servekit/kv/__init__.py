"""servekit.kv: the paged KV cache core.

:class:`KVCacheManager` (sequence-level allocate / commit / free / fork with a verified prefix
cache) over :class:`BlockPool` (blocks, ref counts, O(1) free list, lazy eviction), chained block
hashes, and KV events. This package imports no torch: the KV tensors and batch builders live in
:mod:`servekit.engine.kv_cache`.
"""

from servekit.kv.blocks import (
    BlockPool,
    DoubleFreeError,
    InvalidBlockSizeError,
    KVCacheError,
)
from servekit.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from servekit.kv.events import KVEvent as KVEvent  # a type alias: importable, not in __all__
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
    "KVSequence",
    "OutOfBlocksError",
    "UnknownHashAlgorithmError",
    "UnknownSequenceError",
    "hash_block",
]
