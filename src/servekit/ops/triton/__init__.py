"""Triton kernels behind ``servekit.ops``: store by slot, paged decode (split-K), paged prefill.

These launchers trust their inputs; ``servekit.ops.store_kv`` / ``servekit.ops.paged_attention``
validate shapes and dtypes on the host and dispatch here for CUDA tensors.
"""

from __future__ import annotations

from servekit._optional import require

require("triton", "engine")
import torch

from servekit.ops.triton._config import FP8_DTYPE, INTERPRET, num_sms
from servekit.ops.triton.decode import choose_num_splits, decode_tile_n, paged_decode_attention
from servekit.ops.triton.prefill import paged_prefill_attention
from servekit.ops.triton.store_kv import store_kv

__all__ = [
    "FP8_DTYPE",
    "INTERPRET",
    "choose_num_splits",
    "decode_tile_n",
    "num_sms",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    decode: bool | None = None,
    max_context: int | None = None,
) -> torch.Tensor:
    """Paged attention (contract of ``servekit.ops.paged_attention``) with the Triton kernels.

    Uses the split-K decode kernel when every sequence owns at most one query row, the
    prefill/extend kernel otherwise. A plan tells which (``decode``) and bounds the keys a query
    sees (``max_context``, for the split count); without them ``num_tokens == num_seqs`` means
    decode (every sequence then owns exactly one row, by contract) and the block table's width
    bounds the context, so no device value is read either way.
    """
    if out is None:
        out = torch.empty_like(query)
    if decode is None:
        decode = query.shape[0] == block_tables.shape[0]
    if decode:
        return paged_decode_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
            scale=scale, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
            max_context=max_context,
        )  # fmt: skip
    return paged_prefill_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale=scale, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
