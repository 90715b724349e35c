"""KV cache events: plain frozen data handed to an ``on_event`` callback.

A router (or any observer) replays them to track which block hashes a replica holds:
``BlockStored`` when blocks become hittable, ``BlockRemoved`` when cached blocks are evicted,
``AllBlocksCleared`` when the prefix cache is reset.
"""

from __future__ import annotations

from typing import TypeAlias

from attrs import frozen


@frozen(slots=True)
class BlockStored:
    """Consecutive full blocks of one sequence became hittable (their KV is written).

    ``block_hashes[0]``'s parent is ``parent_hash`` (None for a sequence's first block);
    ``token_ids`` holds ``len(block_hashes) * block_size`` tokens, block after block.
    """

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@frozen(slots=True)
class BlockRemoved:
    """Cached blocks were evicted (their ids reused for other tokens)."""

    block_hashes: tuple[int, ...]


@frozen(slots=True)
class AllBlocksCleared:
    """The prefix cache was reset: no hash stays cached."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
