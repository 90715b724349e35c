"""Split-K paged decode kernel against the reference on hypothesis-drawn small batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.ops.triton import FP8_DTYPE, choose_num_splits, paged_decode_attention

from .paged_case import (
    check_close,
    make_batch,
    oracle_attention,
    poisoned_like,
    relative_error,
)

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# lengths on both sides of block (16/32) and tile/split (multiples of 32) boundaries
LENGTHS = st.one_of(
    st.sampled_from([1, 15, 16, 17, 31, 32, 33, 64, 65, 96, 97]), st.integers(1, 160)
)


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**16),
    seq_lens=st.lists(LENGTHS, min_size=1, max_size=3),
    block_size=st.sampled_from([16, 32]),
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    dtype=DTYPES,
    window=st.one_of(st.none(), st.integers(1, 80)),
    num_splits=st.one_of(st.none(), st.integers(1, 5)),
)
@pytest.mark.slow
def test_decode_matches_reference(
    seed: int, seq_lens: list[int], block_size: int, num_kv_heads: int, group: int,
    head_dim: int, dtype: torch.dtype, window: int | None, num_splits: int | None,
) -> None:  # fmt: skip
    batch = make_batch(
        seed, q_lens=[1] * len(seq_lens), seq_lens=seq_lens, num_kv_heads=num_kv_heads,
        group=group, head_dim=head_dim, block_size=block_size, dtype=dtype,
    )  # fmt: skip
    out = poisoned_like(batch.query)
    paged_decode_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, out, scale=batch.scale, sliding_window=window,
        num_splits=num_splits,
    )  # fmt: skip
    check_close(out, oracle_attention(batch, window), dtype)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), seq_lens=st.lists(LENGTHS, min_size=1, max_size=2),
       scale=st.sampled_from([0.05, 0.5, 2.0]))  # fmt: skip
@pytest.mark.slow
def test_decode_reads_fp8_cache_with_scale(seed: int, seq_lens: list[int], scale: float) -> None:
    batch = make_batch(
        seed, q_lens=[1] * len(seq_lens), seq_lens=seq_lens, num_kv_heads=2, group=4,
        head_dim=64, block_size=16, dtype=torch.float16,
    )  # fmt: skip
    k8 = (batch.k_cache.float() / scale).to(FP8_DTYPE)
    v8 = (batch.v_cache.float() / scale).to(FP8_DTYPE)
    # the oracle sees exactly what the kernel dequantises: fp8 values times the scale
    batch.k_cache = (k8.float() * scale).to(torch.float16)
    batch.v_cache = (v8.float() * scale).to(torch.float16)
    out = poisoned_like(batch.query)
    paged_decode_attention(
        batch.query, k8, v8, batch.block_tables, batch.seq_lens, batch.query_start_loc, out,
        scale=batch.scale, k_scale=scale, v_scale=scale, num_splits=2,
    )  # fmt: skip
    check_close(out, oracle_attention(batch), torch.float16)


@pytest.mark.slow
def test_split_count_does_not_change_the_result() -> None:
    batch = make_batch(7, q_lens=[1, 1], seq_lens=[150, 70], num_kv_heads=2, group=4,
                       head_dim=64, block_size=16, dtype=torch.float32)  # fmt: skip
    outs = []
    for splits in (1, 2, 3, 8):
        out = poisoned_like(batch.query)
        paged_decode_attention(
            batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, out, scale=batch.scale, num_splits=splits,
        )  # fmt: skip
        outs.append(out)
    for out in outs[1:]:
        assert relative_error(out, outs[0]) <= 1e-6


@given(
    num_seqs=st.integers(1, 512), num_kv_heads=st.sampled_from([1, 2, 8]),
    max_context=st.integers(1, 1 << 17), sms=st.sampled_from([4, 108, 132]),
)  # fmt: skip
def test_choose_num_splits_bounds(
    num_seqs: int, num_kv_heads: int, max_context: int, sms: int
) -> None:
    splits = choose_num_splits(num_seqs, num_kv_heads, max_context, block_n=64, sm_count=sms)
    assert 1 <= splits <= 64
    # no split shorter than 4 tiles unless there is only one
    assert splits == 1 or splits * 4 * 64 <= -(-max_context // 64) * 64
    # enough programs for two waves, or as many splits as the length allows
    assert num_seqs * num_kv_heads * splits >= min(2 * sms, num_seqs * num_kv_heads * 64) or (
        splits == max(1, -(-max_context // 64) // 4)
    )
