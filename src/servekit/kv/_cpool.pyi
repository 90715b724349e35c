"""Type stub of the optional C core ``servekit.kv._cpool`` (see ``_cpool.c``).

The arrays are the :class:`~servekit.kv.blocks.BlockPool`'s own: ``next``/``prev``/``ref``/
``values`` are ``array('i')``, ``hashes``/``serial``/``parent``/``keys`` ``array('q')``.
``fn`` is a :data:`~servekit.kv.hashing.BlockHashFn`, or with ``raw`` True
``xxhash.xxh3_64_intdigest`` itself (its results are masked to ``HASH_BITS`` in C).
"""

from array import array
from collections.abc import Callable, Sequence

def allocate(
    next: array[int],
    prev: array[int],
    ref: array[int],
    hashes: array[int],
    serial: array[int],
    keys: array[int],
    values: array[int],
    n: int,
    removed: list[int] | None,
    /,
) -> tuple[list[int], int]: ...
def touch(
    next: array[int], prev: array[int], ref: array[int], blocks: Sequence[int], /
) -> int: ...
def free(
    next: array[int],
    prev: array[int],
    ref: array[int],
    hashes: array[int],
    blocks: Sequence[int],
    /,
) -> tuple[int, int]: ...
def extend_hashes(
    token_ids: Sequence[int],
    hashes: list[int],
    num_blocks: int,
    block_size: int,
    salt: str | None,
    fn: Callable[[bytes, int], int],
    raw: bool,
    /,
) -> None: ...
def commit(
    keys: array[int],
    values: array[int],
    parent: array[int],
    serial: array[int],
    hashes: array[int],
    token_bytes: memoryview,
    token_ids: Sequence[int],
    block_hashes: list[int],
    block_ids: list[int],
    start: int,
    n_full: int,
    link: int,
    next_serial: int,
    salt: str | None,
    salts: dict[int, str],
    fn: Callable[[bytes, int], int],
    raw: bool,
    stored: list[int] | None,
    /,
) -> tuple[int, int]: ...
def find_hit(
    keys: array[int],
    values: array[int],
    parent: array[int],
    serial: array[int],
    token_bytes: memoryview,
    token_ids: Sequence[int],
    block_hashes: list[int],
    start: int,
    max_blocks: int,
    link: int,
    salt: str | None,
    salts: dict[int, str],
    blocks: list[int],
    serials: list[int],
    /,
) -> int: ...
