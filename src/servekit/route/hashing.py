"""64-bit key hashing and virtual-node placement, identical in every process.

Keys are hashed with xxh3-64 by default (``xxh64`` and any ``bytes -> int`` function can be
plugged in); Python's ``hash()`` is never used, so placement does not depend on
``PYTHONHASHSEED``. A node's virtual-node points are ``splitmix64(seed + i * golden)`` where
``seed`` is the hash of the node's name: a node's first ``n`` points are the same for every
``n``, so changing its weight only adds or removes its own points.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import xxhash
from numpy.typing import NDArray

MASK64 = (1 << 64) - 1

#: A key hash: ``bytes -> int`` in ``[0, 2**64)``.
HashFn = Callable[[bytes], int]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def xxh3_64(data: bytes) -> int:
    """xxh3-64 of ``data`` (the default key hash)."""
    return xxhash.xxh3_64_intdigest(data)


def xxh64(data: bytes) -> int:
    """xxh64 of ``data``."""
    return xxhash.xxh64_intdigest(data)


#: Hash functions known to return values in ``[0, 2**64)`` (others are masked).
BUILTIN_HASHES: frozenset[HashFn] = frozenset(
    {xxh3_64, xxh64, xxhash.xxh3_64_intdigest, xxhash.xxh64_intdigest}
)


def as_hash64(fn: HashFn) -> HashFn:
    """The fastest callable equal to ``fn``: the C function for the built-in hashes, ``fn``
    masked to 64 bits for any other."""
    if fn is xxh3_64:
        return xxhash.xxh3_64_intdigest
    if fn is xxh64:
        return xxhash.xxh64_intdigest
    if fn in BUILTIN_HASHES:
        return fn

    def masked(data: bytes) -> int:
        return fn(data) & MASK64

    return masked


def key_bytes(key: str | bytes) -> bytes:
    """The bytes that are hashed for ``key`` (UTF-8 for ``str``)."""
    return key.encode() if isinstance(key, str) else bytes(key)


def hash_keys(keys: Iterable[str | bytes], hash_fn: HashFn = xxh3_64) -> NDArray[np.uint64]:
    """The 64-bit hashes of ``keys`` as a ``uint64`` array."""
    hash_fn = as_hash64(hash_fn)
    hashes = [hash_fn(k.encode() if k.__class__ is str else k) for k in keys]  # type: ignore[union-attr,arg-type]
    return np.array(hashes, dtype=np.uint64)


def splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """The splitmix64 finaliser applied elementwise (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def vnode_points(seed: int, start: int, stop: int) -> NDArray[np.uint64]:
    """Ring points ``start .. stop - 1`` of the node whose name hashes to ``seed`` (unsorted)."""
    index = np.arange(start + 1, stop + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64(np.uint64(seed & MASK64) + index * _GOLDEN)
