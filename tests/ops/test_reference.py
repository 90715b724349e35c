"""servekit.ops.reference against dense causal attention (torch SDPA) on contiguous K/V."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from servekit.engine.kv_cache import build_block_tables, build_slot_mapping
from servekit.ops.reference import AttentionInputError, paged_attention, store_kv

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """q [n, Hq, D] = the last n positions of k/v [L, Hkv, D]; fp32 SDPA with an explicit mask."""
    n, ctx = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().repeat_interleave(group, dim=1).transpose(0, 1),
        v.float().repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, object]:
    num_seqs = draw(st.integers(1, 5))
    ctx_lens = [draw(st.integers(1, 40)) for _ in range(num_seqs)]
    q_lens = [draw(st.sampled_from([1, 1, c, max(1, c // 2), min(c, 3)])) for c in ctx_lens]
    return {
        "ctx_lens": ctx_lens,
        "q_lens": q_lens,
        "block_size": draw(st.sampled_from([1, 2, 4, 8, 16])),
        "num_kv_heads": draw(st.sampled_from([1, 2])),
        "group": draw(st.sampled_from([1, 2, 4])),
        "head_dim": draw(st.sampled_from([4, 8, 16])),
        "window": draw(st.one_of(st.none(), st.integers(1, 12))),
        "dtype": draw(
            st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])
        ),
        "seed": draw(st.integers(0, 2**16)),
    }


def run_case(case: dict[str, object]) -> None:
    ctx_lens: list[int] = case["ctx_lens"]  # type: ignore[assignment]
    q_lens: list[int] = case["q_lens"]  # type: ignore[assignment]
    bs: int = case["block_size"]  # type: ignore[assignment]
    hkv: int = case["num_kv_heads"]  # type: ignore[assignment]
    hq = hkv * case["group"]  # type: ignore[operator]
    d: int = case["head_dim"]  # type: ignore[assignment]
    window: int | None = case["window"]  # type: ignore[assignment]
    dtype: torch.dtype = case["dtype"]  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(case["seed"])  # type: ignore[arg-type]

    need = [-(-c // bs) for c in ctx_lens]
    num_blocks = sum(need) + 3  # unused blocks stay NaN
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_ids, i = [], 0
    for n in need:
        block_ids.append(perm[i : i + n])
        i += n
    k_cache = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    keys = [torch.randn(c, hkv, d, generator=gen).to(dtype) for c in ctx_lens]
    values = [torch.randn(c, hkv, d, generator=gen).to(dtype) for c in ctx_lens]
    slots = build_slot_mapping(
        block_ids, [0] * len(ctx_lens), ctx_lens, bs, pad_to=sum(ctx_lens) + 2
    )
    store_kv(
        torch.cat([*keys, torch.zeros(2, hkv, d, dtype=dtype)]),
        torch.cat([*values, torch.zeros(2, hkv, d, dtype=dtype)]),
        k_cache,
        v_cache,
        slots,
    )
    queries = [torch.randn(n, hq, d, generator=gen).to(dtype) for n in q_lens]
    scale = 1 / math.sqrt(d)
    got = paged_attention(
        torch.cat(queries),
        k_cache,
        v_cache,
        build_block_tables(block_ids),
        torch.tensor(ctx_lens, dtype=torch.int32),
        torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        scale=scale,
        sliding_window=window,
    )
    assert got.dtype == dtype and got.shape == (sum(q_lens), hq, d)
    want = torch.cat(
        [
            dense_attention(q, k, v, scale, window)
            for q, k, v in zip(queries, keys, values, strict=True)
        ]
    ).to(dtype)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_matches_dense_causal_sdpa(case: dict[str, object]) -> None:
    run_case(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_batch_decode_and_chunks(dtype: torch.dtype) -> None:
    """A fixed mix: decodes of several lengths, a first chunk, a chunk over a cached prefix."""
    run_case(
        {
            "ctx_lens": [1, 17, 33, 40, 9],
            "q_lens": [1, 1, 5, 40, 9],
            "block_size": 4,
            "num_kv_heads": 2,
            "group": 4,
            "head_dim": 8,
            "window": None,
            "dtype": dtype,
            "seed": 1,
        }
    )
    run_case(
        {
            "ctx_lens": [30, 7, 12],
            "q_lens": [1, 7, 4],
            "block_size": 2,
            "num_kv_heads": 1,
            "group": 2,
            "head_dim": 4,
            "window": 5,
            "dtype": dtype,
            "seed": 2,
        }
    )


def test_store_kv_skips_padding_and_writes_slots() -> None:
    k_cache = torch.zeros(3, 2, 1, 2)
    v_cache = torch.zeros(3, 2, 1, 2)
    key = torch.arange(6.0).view(3, 1, 2)
    store_kv(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0], dtype=torch.int32))
    assert torch.equal(k_cache[2, 1, 0], key[0, 0]) and torch.equal(v_cache[2, 1, 0], -key[0, 0])
    assert torch.equal(k_cache[0, 0, 0], key[2, 0])
    assert int((k_cache != 0).sum()) == 3  # key[2] holds a 0; key[1] skipped


def test_out_is_written_and_returned() -> None:
    k_cache = torch.randn(2, 4, 1, 4)
    v_cache = torch.randn(2, 4, 1, 4)
    q = torch.randn(1, 2, 4)
    out = torch.empty(1, 2, 4)
    res = paged_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor([[1]], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([0, 1], dtype=torch.int32),
        scale=0.5,
        out=out,
    )
    assert res is out
    torch.testing.assert_close(out, dense_attention(q, k_cache[1, :3], v_cache[1, :3], 0.5, None))


def test_bad_inputs_raise_clear_errors() -> None:
    k_cache = torch.zeros(2, 4, 2, 4)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([2], dtype=torch.int32)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(AttentionInputError, match="multiple"):
        paged_attention(torch.zeros(1, 3, 4), k_cache, k_cache, tables, lens, qsl, scale=1.0)
    with pytest.raises(AttentionInputError, match="query_start_loc"):
        paged_attention(torch.zeros(1, 2, 4), k_cache, k_cache, tables, lens, qsl[:1], scale=1.0)
    with pytest.raises(AttentionInputError, match="query rows"):
        paged_attention(
            torch.zeros(3, 2, 4),
            k_cache,
            k_cache,
            tables,
            lens,
            torch.tensor([0, 3], dtype=torch.int32),
            scale=1.0,
        )
    with pytest.raises(AttentionInputError, match="sliding_window"):
        paged_attention(
            torch.zeros(1, 2, 4), k_cache, k_cache, tables, lens, qsl, scale=1.0, sliding_window=0
        )
    with pytest.raises(AttentionInputError, match="k_cache"):
        store_kv(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), k_cache[0], k_cache[0], qsl[:1])
    with pytest.raises(AttentionInputError, match="slot_mapping"):
        store_kv(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), k_cache, k_cache, qsl)
    with pytest.raises(AttentionInputError, match="key/value"):
        store_kv(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), k_cache, k_cache, qsl[:1])
