"""Chained block hashes for the prefix cache.

``hash(block i) = H(hash(block i-1), token bytes of block i, extra keys)``, where the first block's
parent is a root seed and its extra keys carry the optional cache salt, so equal token prefixes
under different salts never share blocks. Token ids are packed as little-endian int32.

Hashes are 60-bit non-negative ints: small enough to be compact Python ints and to fit int64
arrays. A hash is an index, not a proof: the block pool verifies every hit against the block's
stored tokens and parent link, so a collision can never return wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Final

import xxhash

from servekit.errors import ServekitError

HASH_BITS: Final = 60
HASH_MASK: Final = (1 << HASH_BITS) - 1
HASH_ALGORITHMS: Final = ("xxhash", "sha256")

_pack = struct.pack

#: ``fn(data, parent) -> hash``: hashes ``data`` chained onto ``parent``.
BlockHashFn = Callable[[bytes, int], int]


class UnknownHashAlgorithmError(ServekitError, ValueError):
    """``hash_algorithm`` names no supported algorithm."""


def _xxhash_fn(data: bytes, parent: int) -> int:
    return xxhash.xxh3_64_intdigest(data, parent) & HASH_MASK


def _sha256_fn(data: bytes, parent: int) -> int:
    digest = hashlib.sha256(parent.to_bytes(8, "little") + data).digest()
    return int.from_bytes(digest[:8], "little") & HASH_MASK


def get_hash_fn(algorithm: str) -> BlockHashFn:
    """The chaining hash function for ``algorithm`` (``"xxhash"`` or ``"sha256"``)."""
    if algorithm == "xxhash":
        return _xxhash_fn
    if algorithm == "sha256":
        return _sha256_fn
    raise UnknownHashAlgorithmError(
        f"hash_algorithm must be one of {HASH_ALGORITHMS}, got {algorithm!r}"
    )


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32 bytes (the bytes that are hashed).

    ``struct.error`` for an id that is not an int in ``[-2**31, 2**31)``."""
    return _pack(f"<{len(token_ids)}i", *token_ids)


def salt_bytes(cache_salt: str | None) -> bytes:
    """The extra-key bytes mixed into a sequence's first block (empty without a salt)."""
    if cache_salt is None:
        return b""
    raw = cache_salt.encode()
    return len(raw).to_bytes(4, "little") + raw


def hash_block(
    parent_hash: int | None,
    token_ids: Sequence[int],
    extra_keys: bytes = b"",
    algorithm: str = "xxhash",
) -> int:
    """Hash one block chained onto ``parent_hash`` (None for a sequence's first block)."""
    fn = get_hash_fn(algorithm)
    return fn(extra_keys + pack_tokens(token_ids), 0 if parent_hash is None else parent_hash)


@lru_cache(maxsize=16)
def _block_packer(block_size: int) -> Callable[..., bytes]:
    return struct.Struct(f"<{block_size}i").pack


def extend_block_hashes(
    hashes: list[int],
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    cache_salt: str | None,
    fn: BlockHashFn,
) -> None:
    """Append the hashes of full blocks ``len(hashes) .. num_blocks - 1`` of ``token_ids``.

    Hashes already in ``hashes`` are trusted and never recomputed.
    """
    pack = _block_packer(block_size)
    parent = hashes[-1] if hashes else 0
    for i in range(len(hashes), num_blocks):
        data = pack(*token_ids[i * block_size : (i + 1) * block_size])
        parent = fn(data, parent) if i else fn(salt_bytes(cache_salt) + data, 0)
        hashes.append(parent)
