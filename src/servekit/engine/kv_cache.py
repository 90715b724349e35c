"""Paged KV tensors and the per-step batch builders (slot mapping, block tables).

Layout per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (the layout of
FlashAttention, FlashInfer NHD and vLLM's Triton backend). ``slot = block * block_size + offset``;
slot -1 is padding. Block tables are int32 ``[num_seqs, max_blocks]`` padded with 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt
import torch

from servekit._validators import int_at_least, prefixed
from servekit.kv.blocks import KVCacheError

__all__ = ["KVCache", "KVCacheSizeError", "build_block_tables", "build_slot_mapping"]


class KVCacheSizeError(KVCacheError, ValueError):
    """A KV cache dimension or memory budget is invalid (the message names it)."""


_AT_LEAST_ONE = int_at_least(1, error=prefixed(KVCacheSizeError))


class KVCache:
    """The K and V tensors of every layer, allocated once.

    >>> cache = KVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2, head_dim=4,
    ...                 dtype=torch.float32)
    >>> k, v = cache[0]
    >>> tuple(k.shape)
    (8, 16, 2, 4)
    """

    __slots__ = ("block_size", "dtype", "key_caches", "num_blocks", "value_caches")

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            _AT_LEAST_ONE.check(name, value)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.key_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.value_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of K and V that one block takes across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def from_memory_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """As many blocks as fit in ``budget_bytes`` (at least one, else KVCacheSizeError)."""
        per_block = cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        num_blocks = int(budget_bytes) // per_block
        if num_blocks < 1:
            raise KVCacheSizeError(
                f"budget_bytes={budget_bytes} is below one block ({per_block} bytes)"
            )
        return cls(
            num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.key_caches)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of ``layer``."""
        return self.key_caches[layer], self.value_caches[layer]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (the copies ``fork`` returns)."""
        if not pairs:
            return
        device = self.key_caches[0].device
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
        for cache in chain(self.key_caches, self.value_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))


def _padded_table(
    block_ids: Sequence[Sequence[int]], max_blocks: int | None
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    lengths = np.fromiter((len(b) for b in block_ids), dtype=np.int64, count=len(block_ids))
    width = int(lengths.max(initial=0)) if max_blocks is None else max_blocks
    if max_blocks is not None and lengths.size and int(lengths.max()) > max_blocks:
        raise KVCacheSizeError(f"a block table is longer than max_blocks={max_blocks}")
    table = np.zeros((len(block_ids), width), dtype=np.int32)
    flat = np.fromiter(chain.from_iterable(block_ids), dtype=np.int32, count=int(lengths.sum()))
    table[np.arange(width) < lengths[:, None]] = flat
    return table, lengths


def build_block_tables(
    block_ids: Sequence[Sequence[int]],
    *,
    max_blocks: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """int32 ``[num_seqs, max_blocks]`` block tables, padded with 0 (width: the longest)."""
    return torch.from_numpy(_padded_table(block_ids, max_blocks)[0]).to(device)


def build_slot_mapping(
    block_ids: Sequence[Sequence[int]],
    starts: Sequence[int],
    ends: Sequence[int],
    block_size: int,
    *,
    pad_to: int | None = None,
    dtype: torch.dtype = torch.int64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Slots of positions ``starts[i]:ends[i]`` of each sequence, packed sequence after sequence.

    ``slot = block_ids[i][pos // block_size] * block_size + pos % block_size``; the result is
    padded with -1 to ``pad_to`` entries when given.
    """
    start = np.asarray(starts, dtype=np.int64)
    end = np.asarray(ends, dtype=np.int64)
    if not len(end) == len(start) == len(block_ids):
        raise KVCacheSizeError("build_slot_mapping: block_ids, starts and ends differ in length")
    counts = end - start
    if (counts < 0).any() or (start < 0).any():
        raise KVCacheSizeError("build_slot_mapping: need 0 <= starts[i] <= ends[i]")
    total = int(counts.sum())
    table, lengths = _padded_table(block_ids, None)
    seq = np.repeat(np.arange(len(counts)), counts)
    offsets = np.cumsum(counts) - counts
    pos = np.arange(total) - np.repeat(offsets - start, counts)
    if total and bool(((pos // block_size) >= lengths[seq]).any()):
        raise KVCacheSizeError("build_slot_mapping: a position lies beyond its block table")
    slots = table[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
    if pad_to is not None:
        if pad_to < total:
            raise KVCacheSizeError(f"pad_to={pad_to} is below the {total} slots")
        slots = np.concatenate([slots, np.full(pad_to - total, -1, dtype=np.int64)])
    return torch.from_numpy(slots).to(device=device, dtype=dtype)
