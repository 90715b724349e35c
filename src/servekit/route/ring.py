"""A consistent-hash ring of weighted nodes with virtual nodes and an O(1) lookup table.

Each node owns ``round(weight * vnodes)`` points on a 64-bit ring (see
:func:`~servekit.route.hashing.vnode_points`); a key belongs to the owner of the first point
strictly after the key's hash, wrapping around. Adding a node only inserts its points and
removing one only deletes them, so a change moves keys only to or from that node, and no key
moves between two nodes that did not change.

Balance comes from many virtual nodes (a node's share has a relative spread of about
``1/sqrt(vnodes)``), and lookups stay fast with many points because of a bucket table indexed by
the top bits of the hash: a bucket with no point inside it stores its owner directly (about 80 %
of keys take this path: hash, one index, one list read); the others bisect the sorted points.
Memory is about 14-18 bytes per point (8 for the point, 2 for its owner, 4-8 of table), so
about 12-15 MB for 100 nodes at the default 8192 points per unit of weight.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, islice

import numpy as np
from numpy.typing import NDArray

from servekit._validators import int_at_least, number_in
from servekit.route.errors import (
    DuplicateNodeError,
    EmptyRingError,
    InvalidRouteParameterError,
    UnknownNodeError,
)
from servekit.route.hashing import MASK64, HashFn, as_hash64, hash_keys, vnode_points, xxh3_64

#: Default virtual nodes per unit of weight: max/mean share about 1.03 at 100 nodes.
DEFAULT_VNODES = 8192
#: The most nodes one ring holds (the lookup table stores a node index in 16 bits).
MAX_NODES = 65535
_MAX_TABLE_BITS = 26


_POSITIVE_WEIGHT = number_in(0, low_open=True, error=InvalidRouteParameterError)
_AT_LEAST_ONE = int_at_least(1, error=InvalidRouteParameterError)


def check_weight(weight: float) -> float:
    """``weight`` as a float; :class:`InvalidRouteParameterError` unless finite and > 0."""
    return float(_POSITIVE_WEIGHT.check("weight", weight))


class HashRing:
    """Consistent hashing over weighted nodes; the same key maps to the same node everywhere.

    ``nodes`` is an iterable of names (weight 1) or a mapping ``name -> weight``. ``vnodes`` is
    the number of ring points per unit of weight; ``hash_fn`` hashes key bytes to 64 bits
    (xxh3-64 by default). Lookups never allocate beyond the hash; a change rebuilds the bucket
    table with numpy (tens of milliseconds at 100 nodes x 8192 points).
    """

    __slots__ = (
        "_counts",
        "_hash",
        "_lut",
        "_names",
        "_omv",
        "_owners",
        "_pmv",
        "_points",
        "_seeds",
        "_shift",
        "_slot",
        "_table",
        "_vnodes",
        "_weights",
        "_wrapped",
    )

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, float] = (),
        *,
        vnodes: int = DEFAULT_VNODES,
        hash_fn: HashFn = xxh3_64,
    ) -> None:
        _AT_LEAST_ONE.check("vnodes", vnodes)
        self._vnodes = vnodes
        self._hash = as_hash64(hash_fn)
        self._names: list[str] = []
        self._slot: dict[str, int] = {}
        self._weights: list[float] = []
        self._seeds: list[int] = []
        self._counts: list[int] = []
        items = nodes.items() if isinstance(nodes, Mapping) else ((n, 1.0) for n in nodes)
        chunks: list[NDArray[np.uint64]] = []
        owners: list[NDArray[np.uint16]] = []
        for name, weight in items:
            slot = self._register(name, weight)
            chunks.append(vnode_points(self._seeds[slot], 0, self._counts[slot]))
            owners.append(np.full(self._counts[slot], slot, dtype=np.uint16))
        if chunks:
            points = np.concatenate(chunks)
            order = np.argsort(points)
            self._points = points[order]
            self._owners = np.concatenate(owners)[order]
        else:
            self._points = np.empty(0, dtype=np.uint64)
            self._owners = np.empty(0, dtype=np.uint16)
        self._reindex()

    # ---- membership -------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes, in the order they were added (indices of :meth:`locate_hashes`)."""
        return tuple(self._names)

    @property
    def vnodes(self) -> int:
        """Ring points per unit of weight."""
        return self._vnodes

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, node: object) -> bool:
        return node in self._slot

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def weight(self, node: str) -> float:
        """The weight of ``node``."""
        return self._weights[self._index(node)]

    def num_points(self, node: str) -> int:
        """How many ring points ``node`` owns (``max(1, round(weight * vnodes))``)."""
        return self._counts[self._index(node)]

    def add(self, node: str, weight: float = 1.0) -> None:
        """Add ``node``: only keys that now belong to it move (to it)."""
        slot = self._register(node, weight)
        self._insert(slot, 0, self._counts[slot])
        self._reindex()

    def remove(self, node: str) -> None:
        """Remove ``node``: only its keys move, each to the next node on its walk."""
        slot = self._index(node)
        keep = self._owners != slot
        self._points = self._points[keep]
        owners = self._owners[keep]
        owners[owners > slot] -= 1
        self._owners = owners
        del self._slot[node]
        self._names = self._names[:slot] + self._names[slot + 1 :]
        for lst in (self._weights, self._seeds, self._counts):
            del lst[slot]
        self._slot = {name: i for i, name in enumerate(self._names)}
        self._reindex()

    def set_weight(self, node: str, weight: float) -> None:
        """Change ``node``'s weight: only keys to or from ``node`` move."""
        slot = self._index(node)
        weight = check_weight(weight)
        old, new = self._counts[slot], self._point_count(weight)
        self._weights[slot] = weight
        if new == old:
            return
        self._counts[slot] = new
        if new > old:
            self._insert(slot, old, new)
        else:  # a node's first `new` points are the same as before: drop the rest
            keep = self._owners != slot
            self._points, self._owners = self._points[keep], self._owners[keep]
            self._insert(slot, 0, new)
        self._reindex()

    # ---- lookup -----------------------------------------------------------------------------

    def hash(self, key: str | bytes) -> int:
        """The 64-bit hash of ``key`` under this ring's hash function."""
        return self._hash(key.encode() if isinstance(key, str) else key)

    def lookup(self, key: str | bytes) -> str:
        """The node that owns ``key``."""
        h = self._hash(key.encode() if key.__class__ is str else key)  # type: ignore[union-attr,arg-type]
        node = self._lut[self._table[h >> self._shift]]
        if node is None:
            return self._successor(h)
        return node

    def lookup_hash(self, key_hash: int) -> str:
        """The node that owns a key whose 64-bit hash is ``key_hash``."""
        h = key_hash & MASK64
        node = self._lut[self._table[h >> self._shift]]
        if node is None:
            return self._successor(h)
        return node

    def walk(self, key: str | bytes) -> Iterator[str]:
        """Every node, each once, in the order of ``key``'s clockwise walk (owner first)."""
        return self.walk_hash(self.hash(key))

    def walk_hash(self, key_hash: int) -> Iterator[str]:
        """:meth:`walk` for a precomputed 64-bit key hash."""
        if not self._names:
            raise EmptyRingError("the ring has no nodes")
        return _walk(key_hash & MASK64, self._names, self._pmv, self._omv)

    def fallbacks(self, key: str | bytes, n: int) -> list[str]:
        """The first ``n`` distinct nodes of ``key``'s walk: the owner, then its fallbacks."""
        if n < 0:
            raise InvalidRouteParameterError("n", f"must be >= 0, got {n}")
        return list(islice(self.walk(key), n))

    def lookup_many(self, keys: Iterable[str | bytes]) -> list[str]:
        """The owners of many keys at once (hashing in Python, the rest vectorized)."""
        index = self.locate_hashes(hash_keys(keys, self._hash))
        names = self._names
        return [names[i] for i in index.tolist()]

    def locate_hashes(self, hashes: NDArray[np.uint64]) -> NDArray[np.intp]:
        """For each 64-bit hash, the index of its owner in :attr:`nodes` (vectorized)."""
        if not self._names:
            raise EmptyRingError("the ring has no nodes")
        hashes = np.asarray(hashes, dtype=np.uint64)
        table = np.frombuffer(
            self._table, dtype=np.uint8 if isinstance(self._table, bytes) else np.uint16
        )
        direct = table[hashes >> np.uint64(self._shift)]
        out: NDArray[np.intp] = direct.astype(np.intp)
        miss = direct == len(self._lut) - 1
        if miss.any():
            pos = np.searchsorted(self._points, hashes[miss], side="right")
            out[miss] = self._wrapped[pos]
        return out

    # ---- introspection ----------------------------------------------------------------------

    def shares(self) -> dict[str, float]:
        """The exact fraction of the 64-bit hash space each node owns."""
        points, owners = self._points, self._owners
        if len(points) == 0:
            return {}
        gaps = np.diff(points, prepend=points[-1:]).astype(np.float64)  # wraps modulo 2**64
        if len(points) == 1:
            gaps[0] = 2.0**64
        total = np.bincount(owners, weights=gaps, minlength=len(self._names)) / 2.0**64
        return dict(zip(self._names, total.tolist(), strict=True))

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the ring's arrays and lookup table (not counting the node names)."""
        table_bytes = len(self._table) * (1 if isinstance(self._table, bytes) else 2)
        return int(self._points.nbytes + self._wrapped.nbytes) + table_bytes

    def __repr__(self) -> str:
        return f"HashRing(nodes={len(self._names)}, points={len(self._points)})"

    # ---- internals --------------------------------------------------------------------------

    def _index(self, node: str) -> int:
        try:
            return self._slot[node]
        except KeyError:
            raise UnknownNodeError(node) from None
        except TypeError:
            raise UnknownNodeError(repr(node)) from None

    def _point_count(self, weight: float) -> int:
        return max(1, round(weight * self._vnodes))

    def _register(self, node: str, weight: float) -> int:
        if not isinstance(node, str):
            raise InvalidRouteParameterError("node", f"must be a str, got {type(node).__name__}")
        if node in self._slot:
            raise DuplicateNodeError(node)
        weight = check_weight(weight)
        if len(self._names) >= MAX_NODES:
            raise InvalidRouteParameterError("node", f"a ring holds at most {MAX_NODES} nodes")
        slot = len(self._names)
        self._slot[node] = slot
        self._names = [*self._names, node]
        self._weights.append(weight)
        self._seeds.append(self._hash(node.encode()))
        self._counts.append(self._point_count(weight))
        return slot

    def _insert(self, slot: int, start: int, stop: int) -> None:
        new = np.sort(vnode_points(self._seeds[slot], start, stop))
        pos = np.searchsorted(self._points, new, side="right")
        self._points = np.insert(self._points, pos, new)
        self._owners = np.insert(self._owners, pos, np.uint16(slot))

    def _reindex(self) -> None:
        """Rebuild the wrapped owner array and the bucket table after a change."""
        points, owners = self._points, self._owners
        n = len(self._names)
        sentinel = 255 if n < 255 else 65535
        self._lut: list[str | None] = [*self._names, *([None] * (sentinel + 1 - n))]
        self._wrapped = np.append(owners, owners[:1])
        self._owners = self._wrapped[:-1]  # a view: owners are stored once
        self._pmv = points.data
        self._omv = self._wrapped.data
        if len(points) == 0:
            self._shift = 64
            self._table: bytes | array[int] = bytes([sentinel])
            return
        bits = min(_MAX_TABLE_BITS, (len(points) - 1).bit_length() + 2)  # 4-8 buckets per point
        self._shift = 64 - bits
        bucket = (points >> np.uint64(self._shift)).astype(np.intp)
        counts = np.bincount(bucket, minlength=1 << bits)
        first_after = np.cumsum(counts)  # index of the first point past each bucket
        dtype = np.uint8 if sentinel == 255 else np.uint16
        table = np.where(counts == 0, self._wrapped[first_after], sentinel).astype(dtype)
        self._table = table.tobytes() if dtype is np.uint8 else array("H", table.tobytes())

    def _successor(self, h: int) -> str:
        if not self._names:
            raise EmptyRingError("the ring has no nodes")
        return self._names[self._omv[bisect_right(self._pmv, h)]]


def _walk(h: int, names: list[str], pmv: memoryview, omv: memoryview) -> Iterator[str]:
    """Distinct owners clockwise from ``h``; works on a snapshot, so ring changes during the
    iteration do not affect it."""
    size = len(omv) - 1
    start = bisect_right(pmv, h) % size
    seen = bytearray(len(names))
    remaining = len(names)
    for i in chain(range(start, size), range(start)):
        slot = omv[i]
        if not seen[slot]:
            seen[slot] = 1
            yield names[slot]
            remaining -= 1
            if not remaining:
                return
