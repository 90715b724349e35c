"""Random paged-KV batches for the kernel tests (scattered block tables, NaN-poisoned cache) and
the oracle: ``servekit.ops.reference``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from servekit import ops
from servekit.ops import reference

#: CUDA when there is one (the kernels compile), else CPU (the Triton interpreter)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class PagedBatch:
    """One batch: packed query rows and the caches holding every sequence's context K/V."""

    query: torch.Tensor  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], NaN where unused
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], scattered, padded with 0
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    scale: float


def make_batch(
    seed: int,
    *,
    q_lens: list[int],
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
    spare_columns: int = 1,
    device: torch.device = DEVICE,
) -> PagedBatch:
    """Build a batch whose sequence ``b`` has ``seq_lens[b]`` cached tokens, the last
    ``q_lens[b]`` of them being query rows; blocks are placed at random and unused cache
    entries (other blocks, tails of last blocks) hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    width = max(pages, default=0) + spare_columns
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        ids = [order.pop() for _ in range(pages[b])]
        tables[b, : pages[b]] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)
        v = torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)
        for pos in range(n):
            k_cache[ids[pos // block_size], pos % block_size] = k[pos]
            v_cache[ids[pos // block_size], pos % block_size] = v[pos]
    num_tokens = sum(q_lens)
    query = torch.randn((num_tokens, num_kv_heads * group, head_dim), generator=gen).to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        query=query.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )  # fmt: skip


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in fp64 (NaN if anything is non-finite)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def oracle_attention(batch: PagedBatch, sliding_window: int | None = None) -> torch.Tensor:
    """The torch reference's output for ``batch``: the kernels' ground truth."""
    return reference.paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, scale=batch.scale, sliding_window=sliding_window,
    )  # fmt: skip


def attend(batch: PagedBatch, **kwargs: Any) -> torch.Tensor:
    """``servekit.ops.paged_attention`` on ``batch``; ``kwargs`` pass through (backend, plan...)."""
    return ops.paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, scale=batch.scale, **kwargs,
    )  # fmt: skip


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer shaped like ``t`` and full of NaN, so unwritten entries show."""
    return torch.full_like(t, float("nan"))


def check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Every entry written (finite) and within the dtype's relative tolerance."""
    assert bool(torch.isfinite(actual).all()), "output has unwritten (NaN) or non-finite entries"
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]} for {dtype}"


def reference_store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """The torch reference's ``store_kv``: the ground truth of the store kernel."""
    reference.store_kv(key, value, k_cache, v_cache, slot_mapping)
