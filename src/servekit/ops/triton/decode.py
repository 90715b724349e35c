"""Paged decode attention: one query row per sequence, GQA packed into ``tl.dot``, split-K.

Program ``(seq, kv_head, split)`` loads the query rows of every query head that shares
``kv_head`` as one ``[BLOCK_G, D]`` tile (the group padded to at least 16 rows, the ``tl.dot``
minimum), walks its share of the sequence's KV tiles through the block table with an online
softmax, and writes a normalised partial output plus its log-sum-exp (base 2). A second kernel
merges the splits. With one split the first kernel writes the final output directly.
"""

# Triton kernel parameters are untyped by nature (pointers, constexprs); the launchers are typed.
# mypy: allow-untyped-decorators, disable-error-code="no-untyped-def"

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servekit.ops.triton._config import (
    FP8_DTYPE,
    INTERPRET,
    LOG2E,
    block_d,
    dot_precision,
    num_sms,
    upcast,
)
from servekit.ops.triton._tile import attend_tile, load_kv_tile

#: Smallest number of KV tiles worth giving a split of its own.
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 64


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, k_scale, v_scale, sliding_window, num_splits, head_dim,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_WINDOW: tl.constexpr, KV_SCALED: tl.constexpr, DIRECT_OUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == row:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # KV tiles of this split: the sequence's tiles [first, last) cut into num_splits shares
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(seq_len - sliding_window, 0)
    first_tile = kv_start // BLOCK_N
    num_tiles = tl.cdiv(seq_len, BLOCK_N) - first_tile
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = first_tile + split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, first_tile + num_tiles)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < head_dim
    q = tl.load(
        q_ptr + row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos < seq_len) & (pos >= kv_start)
        k, v = load_kv_tile(
            table, k_cache_ptr, v_cache_ptr, pos, valid, d, d_mask, kv_head, q,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            k_scale, v_scale, BLOCK_SIZE, UPCAST, KV_SCALED,
        )  # fmt: skip
        m_i, l_i, acc = attend_tile(q, k, v, valid[None, :], qk_scale, m_i, l_i, acc, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        dst = (out_ptr + row.to(tl.int64) * stride_ot + head[:, None] * stride_oh
               + d[None, :] * stride_od)  # fmt: skip
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partials: out [seq, q_head, BLOCK_S, BLOCK_D] and lse [seq, q_head, BLOCK_S], contiguous
        base = seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head
        part = part_out_ptr + ((base[:, None] * BLOCK_S + split) * BLOCK_D + d[None, :])
        tl.store(part, out, mask=o_mask)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_lse_ptr + base * BLOCK_S + split, lse, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_loc_ptr, num_splits, head_dim,
    stride_ot, stride_oh, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == row:
        return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = seq.to(tl.int64) * tl.num_programs(1) + head
    lse = tl.load(part_lse_ptr + base * BLOCK_S + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    part = tl.load(
        part_out_ptr + (base * BLOCK_S + s[:, None]) * BLOCK_D + d[None, :],
        mask=(s[:, None] < num_splits) & (d[None, :] < head_dim), other=0.0,
    )  # fmt: skip
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    dst = out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + d * stride_od
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def decode_tile_n() -> int:
    """KV positions per inner-loop tile (a multiple of neither page size is required)."""
    return 32 if INTERPRET else 64


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, *, block_n: int, sm_count: int
) -> int:
    """Splits per sequence so that ``seqs * kv_heads * splits`` fills about two waves of SMs.

    ``max_context`` bounds the context length (the block table's width times the page size, so
    no device sync is needed); no split gets fewer than ``MIN_TILES_PER_SPLIT`` tiles of it.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = triton.cdiv(2 * sm_count, programs)
    by_length = max(1, triton.cdiv(max_context, block_n) // MIN_TILES_PER_SPLIT)
    return int(max(1, min(wanted, by_length, MAX_SPLITS)))


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
    max_context: int | None = None,
) -> torch.Tensor:
    """Decode attention into ``out`` for sequences that own at most one query row each.

    ``num_splits`` overrides :func:`choose_num_splits`, which sizes splits by ``max_context``
    (an upper bound on the keys a query sees, from a plan) or else by the block table's width.
    Inputs are validated by ``servekit.ops.paged_attention``, not here.
    """
    num_seqs = block_tables.shape[0]
    _, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_n = decode_tile_n()
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads,
            block_tables.shape[1] * block_size if max_context is None else max_context,
            block_n=block_n, sm_count=num_sms(query.device),
        )  # fmt: skip
    bd = block_d(head_dim)
    bs = triton.next_power_of_2(num_splits)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(
            (num_seqs, num_q_heads, bs, bd), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(
            (num_seqs, num_q_heads, bs), dtype=torch.float32, device=query.device
        )
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        out, part_out, part_lse,
        scale * LOG2E, float(k_scale), float(v_scale), int(sliding_window or 0), num_splits, head_dim,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        *out.stride(),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=bd,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_S=bs,
        USE_WINDOW=sliding_window is not None, KV_SCALED=k_cache.dtype == FP8_DTYPE,
        DIRECT_OUT=direct, UPCAST=upcast(query.dtype) or upcast(k_cache.dtype),
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if not direct:
        _merge_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, query_start_loc, num_splits, head_dim, *out.stride(),
            BLOCK_S=bs, BLOCK_D=bd, num_warps=4,
        )  # fmt: skip
    return out
