"""Paged prefill / extend attention: packed new tokens attend causally to their cached prefix.

Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``, the last tokens of
its ``seq_lens[b]`` context. A program handles ``BLOCK_Q`` consecutive query tokens of one
sequence and all ``GROUP`` query heads of one KV head, packed as ``BLOCK_M = BLOCK_Q * BLOCK_G``
rows of a single ``tl.dot`` tile (row ``r`` = token ``r // BLOCK_G``, head ``r % BLOCK_G``). It
reads the prefix and the new tokens alike through the block table (their K/V are already stored),
so the same kernel serves whole prompts, chunked prefill and decode. The grid has
``num_tokens // BLOCK_Q + num_seqs`` query blocks, enough for every sequence; a program finds
its sequence by binary search over ``query_start_loc`` (no host sync).
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
    upcast,
)
from servekit.ops.triton._tile import attend_tile, load_kv_tile


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks start at or before ``q_block`` (its first block is
    ``query_start_loc[b] // BLOCK_Q + b``, strictly increasing in ``b``)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    qk_scale, k_scale, v_scale, sliding_window, num_seqs, head_dim,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, KV_SCALED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    local = (q_block - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first token of this block
    if local >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens before the first query row

    r = tl.arange(0, BLOCK_M)
    token = local + r // BLOCK_G
    g = r % BLOCK_G
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    row_valid = (token < q_len) & (g < GROUP)
    q_pos = context + token  # absolute position of each row's token
    q_row = (q_begin + token).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    kv_end = context + tl.minimum(local + BLOCK_Q, q_len)  # one past the last key needed
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(context + local - sliding_window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(kv_start // BLOCK_N, tl.cdiv(kv_end, BLOCK_N)):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos < kv_end) & (pos >= kv_start)
        k, v = load_kv_tile(
            table, k_cache_ptr, v_cache_ptr, pos, valid, d, d_mask, kv_head, q,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            k_scale, v_scale, BLOCK_SIZE, UPCAST, KV_SCALED,
        )  # fmt: skip
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - pos[None, :] < sliding_window)
        m_i, l_i, acc = attend_tile(q, k, v, allowed, qk_scale, m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    dst = out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def prefill_tiles(group: int) -> tuple[int, int, int]:
    """``(BLOCK_G, BLOCK_Q, BLOCK_M)`` for a GQA group: the group padded to a power of two and
    as many query tokens as fill ``BLOCK_M`` rows (at least 16, the ``tl.dot`` minimum)."""
    block_g = triton.next_power_of_2(group)
    block_m = max(16 if INTERPRET else 64, block_g)
    return block_g, block_m // block_g, block_m


def paged_prefill_attention(
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
) -> torch.Tensor:
    """Causal attention of packed query rows over their paged context, into ``out``.

    Inputs are validated by ``servekit.ops.paged_attention``, not here.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0 or num_tokens == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_g, block_q, block_m = prefill_tiles(group)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, float(k_scale), float(v_scale), int(sliding_window or 0), num_seqs, head_dim,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        *out.stride(),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_D=block_d(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=32 if INTERPRET else 64,
        USE_WINDOW=sliding_window is not None, KV_SCALED=k_cache.dtype == FP8_DTYPE,
        UPCAST=upcast(query.dtype) or upcast(k_cache.dtype),
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
