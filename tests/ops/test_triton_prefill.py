"""Paged prefill/extend kernel against the reference: packed requests over cached prefixes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.ops.triton import paged_prefill_attention

from .paged_case import (
    PagedBatch,
    check_close,
    make_batch,
    oracle_attention,
    poisoned_like,
    relative_error,
)

# (cached prefix, new tokens) per request: whole prompts, chunks over a prefix, decode rows
REQUESTS = st.tuples(
    st.one_of(st.just(0), st.integers(0, 100)),
    st.one_of(st.just(1), st.sampled_from([15, 16, 17, 33]), st.integers(1, 40)),
)


def run(batch: PagedBatch, window: int | None, *, strided: bool = False) -> torch.Tensor:
    query, out = batch.query, poisoned_like(batch.query)
    if strided:  # query and out as column slices of wider (qkv-like) tensors
        t, h, d = query.shape
        wide = torch.randn(t, 2 * h, d, device=query.device).to(query.dtype)
        wide[:, :h] = query
        query = wide[:, :h]
        out = torch.full_like(wide, float("nan"))[:, h:]
    paged_prefill_attention(
        query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, out, scale=batch.scale, sliding_window=window,
    )  # fmt: skip
    return out


@settings(max_examples=50)
@given(
    seed=st.integers(0, 2**16),
    requests=st.lists(REQUESTS, min_size=1, max_size=3),
    block_size=st.sampled_from([16, 32]),
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    window=st.one_of(st.none(), st.integers(1, 48)),
    strided=st.booleans(),
)
@pytest.mark.slow
def test_prefill_matches_reference(
    seed: int, requests: list[tuple[int, int]], block_size: int, num_kv_heads: int, group: int,
    head_dim: int, dtype: torch.dtype, window: int | None, strided: bool,
) -> None:  # fmt: skip
    batch = make_batch(
        seed, q_lens=[q for _, q in requests], seq_lens=[c + q for c, q in requests],
        num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
        dtype=dtype,
    )  # fmt: skip
    out = run(batch, window, strided=strided)
    check_close(out, oracle_attention(batch, window), dtype)


@pytest.mark.slow
def test_chunked_prefill_equals_whole_prefill() -> None:
    whole = make_batch(3, q_lens=[70], seq_lens=[70], num_kv_heads=2, group=4, head_dim=64,
                       block_size=16, dtype=torch.float32)  # fmt: skip
    expected = run(whole, None)
    # the same prompt in chunks of 30, 25 and 15 tokens, each attending to the cache before it
    start = 0
    for size in (30, 25, 15):
        chunk = make_batch(3, q_lens=[70], seq_lens=[70], num_kv_heads=2, group=4, head_dim=64,
                           block_size=16, dtype=torch.float32)  # fmt: skip
        chunk.query = chunk.query[start : start + size]
        chunk.seq_lens = torch.tensor([start + size], dtype=torch.int32)
        chunk.query_start_loc = torch.tensor([0, size], dtype=torch.int32)
        got = run(chunk, None)
        assert relative_error(got, expected[start : start + size]) <= 1e-6
        start += size


def test_requests_without_rows_are_skipped() -> None:
    batch = make_batch(5, q_lens=[4, 0, 3], seq_lens=[20, 9, 40], num_kv_heads=1, group=2,
                       head_dim=64, block_size=16, dtype=torch.float32)  # fmt: skip
    check_close(run(batch, None), oracle_attention(batch), torch.float32)
