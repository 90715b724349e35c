"""Chained block hashes."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from servekit.kv.hashing import HASH_MASK, extend_block_hashes, get_hash_fn, hash_block, salt_bytes


@given(
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=40),
    block_size=st.sampled_from([1, 4, 8]),
    salt=st.one_of(st.none(), st.text(max_size=5)),
    split=st.integers(0, 10),
    algorithm=st.sampled_from(["xxhash", "sha256"]),
)
def test_extend_equals_block_by_block_chain(
    tokens: list[int], block_size: int, salt: str | None, split: int, algorithm: str
) -> None:
    fn = get_hash_fn(algorithm)
    n = len(tokens) // block_size
    hashes: list[int] = []
    extend_block_hashes(hashes, tokens, block_size, min(split, n), salt, fn)
    extend_block_hashes(hashes, tokens, block_size, n, salt, fn)
    expected: list[int] = []
    parent = None
    for i in range(n):
        extra = salt_bytes(salt) if i == 0 else b""
        parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size], extra, algorithm)
        expected.append(parent)
    assert hashes == expected
    assert all(0 <= h <= HASH_MASK for h in hashes)


def test_hash_depends_on_parent_salt_tokens_and_algorithm() -> None:
    base = hash_block(None, [1, 2, 3, 4])
    assert base != hash_block(base, [1, 2, 3, 4])
    assert base != hash_block(None, [1, 2, 3, 5])
    assert base != hash_block(None, [1, 2, 3, 4], salt_bytes("t"))
    assert salt_bytes("ab") != salt_bytes("a") and salt_bytes(None) == b""
    assert base != hash_block(None, [1, 2, 3, 4], algorithm="sha256")
    assert base == hash_block(None, [1, 2, 3, 4])  # deterministic across calls
