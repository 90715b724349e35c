"""Routing keys: a session id, an API key, or the prompt's first blocks (prefix affinity).

The prefix key is the KV prefix cache's own chained hash of the prompt's first ``num_blocks``
full blocks (:mod:`servekit.kv.hashing`, same block size, algorithm and cache salt), so requests
that would hit the same cached blocks on a replica route to the same replica. A prompt shorter
than one block has no prefix key.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import field, frozen

from servekit._validators import int_at_least
from servekit.kv.hashing import BlockHashFn, extend_block_hashes, get_hash_fn
from servekit.route.errors import InvalidRouteParameterError

_AT_LEAST_ONE = int_at_least(1, error=InvalidRouteParameterError)


@frozen(slots=True)
class PrefixKey:
    """Derives a prefix-affinity key from token ids, hashed exactly as the KV prefix cache does.

    ``block_size`` and ``hash_algorithm`` must match the replicas' KV cache; ``num_blocks`` is
    how many leading blocks define the affinity (more blocks: finer affinity, less sharing).
    """

    block_size: int = field(default=16, validator=_AT_LEAST_ONE)
    num_blocks: int = field(default=4, validator=_AT_LEAST_ONE)
    hash_algorithm: str = "xxhash"
    _fn: BlockHashFn = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_fn", get_hash_fn(self.hash_algorithm))

    def block_hash(self, token_ids: Sequence[int], cache_salt: str | None = None) -> int | None:
        """The KV block hash of the last of the first ``num_blocks`` full blocks, or None when
        the prompt has no full block."""
        n = min(self.num_blocks, len(token_ids) // self.block_size)
        if n == 0:
            return None
        hashes: list[int] = []
        extend_block_hashes(hashes, token_ids, self.block_size, n, cache_salt, self._fn)
        return hashes[-1]

    def block_hashes(
        self, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[int, ...]:
        """The KV block hashes of every full block of the prompt (for a cache index)."""
        hashes: list[int] = []
        extend_block_hashes(hashes, token_ids, self.block_size, len(token_ids) // self.block_size,
                            cache_salt, self._fn)
        return tuple(hashes)

    def key(self, token_ids: Sequence[int], cache_salt: str | None = None) -> bytes | None:
        """The routing key bytes for a prompt (the block hash, 8 bytes little-endian)."""
        h = self.block_hash(token_ids, cache_salt)
        return None if h is None else h.to_bytes(8, "little")
