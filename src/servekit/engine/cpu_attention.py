"""The engine's CPU attention path: paged attention planned once per step, run per layer.

``servekit.ops.paged_attention`` is general (any batch, every call stands alone) and is what
the engine uses on CUDA. On CPU the per-call work of the general path (reading lengths back,
building masks, gathering each sequence's context) costs more than the math for tiny models,
so the runner plans the step once (:class:`CpuAttentionPlan`) and each layer only runs tensor
ops:

* decode rows (one query per sequence), sorted by length into a few groups so padding stays
  small: one ``index_select`` of each group's blocks, a batched matmul per KV head that reads
  the gathered K/V in place, masks built once per step; padding reads a never-written zero
  "null" block, so only the tails of last blocks are zeroed in V;
* a prefill chunk with no cached prefix attends only to its own keys and values: SDPA on the
  layer's ``key``/``value`` directly (``is_causal``), no gather from the cache at all;
* a chunk over a cached prefix gathers its context and runs SDPA with a bottom-right causal
  mask (built once per step).

Numerically it is the reference (fp32 scores and softmax); tests compare it with
``servekit.ops.reference`` on random paged layouts, NaN-poisoned unused slots included.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from attrs import define

__all__ = ["CpuAttentionPlan", "cpu_paged_attention"]


@define(slots=True)
class _Chunk:
    """One prefill chunk: query rows [start, end) are the last tokens of ``ctx_len`` context."""

    start: int
    end: int
    ctx_len: int
    block_ids: torch.Tensor | None  # context blocks when there is a cached prefix
    mask: torch.Tensor | None  # [q, ctx] bool (True = attend), None for a plain causal chunk


@define(slots=True)
class _DecodeGroup:
    """Decode rows of similar context length, attended together (padding stays small)."""

    rows: torch.Tensor  # long [b] query rows
    blocks: torch.Tensor  # long [b * nb] block ids, padded with the null block
    hidden: torch.Tensor  # bool [b, nb * block_size], True = not visible
    tail: torch.Tensor | None  # long flat indices of [b * ctx] slots to zero in the gathered V;
    # None: no null block, zero every hidden slot


@define(slots=True)
class CpuAttentionPlan:
    """Per-step inputs of :func:`cpu_paged_attention`, built once from the packed batch."""

    groups: list[_DecodeGroup]
    chunks: list[_Chunk]

    @classmethod
    def build(
        cls,
        block_tables: npt.NDArray[np.int32],
        seq_lens: npt.NDArray[np.int32],
        query_start_loc: npt.NDArray[np.int32],
        block_size: int,
        sliding_window: int | None = None,
        null_block: int | None = None,
        group_size: int = 16,
    ) -> CpuAttentionPlan:
        """Plan a step from the host-side arrays of a packed batch.

        ``null_block`` is a block that is all zeros and never written; when given, padding reads
        it and only the tails of the last blocks need zeroing. Decodes are sorted by length
        and split into groups of about ``group_size`` so each group pads to its own longest.
        """
        q_lens = np.diff(query_start_loc)
        is_decode = q_lens == 1
        dec = np.flatnonzero(is_decode)
        groups = []
        if dec.size:
            dec = dec[np.argsort(seq_lens[dec], kind="stable")]
            parts = max(1, min(4, round(dec.size / group_size)))
            for part in np.array_split(dec, parts):
                groups.append(_decode_group(part, block_tables, seq_lens, query_start_loc,
                                            block_size, sliding_window, null_block))
        chunks: list[_Chunk] = []
        for b in np.flatnonzero(~is_decode):
            start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
            n, ctx = end - start, int(seq_lens[b])
            if n == 0:
                continue
            blocks = None
            if ctx > n:
                nb = -(-ctx // block_size)
                blocks = torch.from_numpy(block_tables[b, :nb].astype(np.int64))
            mask = None
            if ctx > n or sliding_window is not None:
                q_pos = np.arange(ctx - n, ctx)[:, None]
                k_pos = np.arange(ctx)[None, :]
                visible = k_pos <= q_pos
                if sliding_window is not None:
                    visible &= (q_pos - k_pos) < sliding_window
                mask = torch.from_numpy(visible)
            chunks.append(_Chunk(start, end, ctx, blocks, mask))
        return cls(groups, chunks)


def _decode_group(
    seqs: npt.NDArray[np.intp], block_tables: npt.NDArray[np.int32],
    seq_lens: npt.NDArray[np.int32], query_start_loc: npt.NDArray[np.int32], block_size: int,
    sliding_window: int | None, null_block: int | None,
) -> _DecodeGroup:
    lens = seq_lens[seqs].astype(np.int64)
    nbs = -(-lens // block_size)
    nb = int(nbs.max())
    blocks = block_tables[seqs, :nb].astype(np.int64)
    pos = np.arange(nb * block_size)[None, :]
    hidden = pos >= lens[:, None]
    tail = None
    if null_block is not None:
        blocks[np.arange(nb)[None, :] >= nbs[:, None]] = null_block
        in_tail = hidden & (pos < (nbs * block_size)[:, None])
        tail = torch.from_numpy(np.flatnonzero(in_tail))
    if sliding_window is not None:
        hidden |= pos <= (lens[:, None] - 1 - sliding_window)
    return _DecodeGroup(torch.from_numpy(query_start_loc[seqs].astype(np.int64)),
                        torch.from_numpy(blocks.reshape(-1)), torch.from_numpy(hidden), tail)


def cpu_paged_attention(
    plan: CpuAttentionPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` ``[T, Hq, D]`` for one layer; this step's ``key``/``value``
    ``[T, Hkv, D]`` are already stored in ``k_cache``/``v_cache``. Returns ``[T, Hq, D]``."""
    tokens, q_heads, dim = query.shape
    kv_heads = key.shape[1]
    out = query.new_empty(tokens, q_heads, dim)
    for group in plan.groups:
        out[group.rows] = _decode(group, query.index_select(0, group.rows),
                                  k_cache, v_cache, scale, kv_heads)
    gqa = q_heads != kv_heads
    for c in plan.chunks:
        q = query[c.start : c.end].transpose(0, 1)  # [Hq, n, D]
        if c.block_ids is None:
            k = key[c.start : c.end].transpose(0, 1)
            v = value[c.start : c.end].transpose(0, 1)
        else:
            k = _context(k_cache, c.block_ids, c.ctx_len)
            v = _context(v_cache, c.block_ids, c.ctx_len)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=c.mask, is_causal=c.mask is None, scale=scale, enable_gqa=gqa)
        out[c.start : c.end] = o.transpose(0, 1)
    return out


def _context(cache: torch.Tensor, block_ids: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """``[Hkv, ctx_len, D]`` keys or values of one sequence, gathered from its blocks."""
    blocks = cache.index_select(0, block_ids)
    return blocks.flatten(0, 1)[:ctx_len].transpose(0, 1)


def _decode(group: _DecodeGroup, q: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:
    batch, q_heads, dim = q.shape
    size = q_heads // kv_heads
    hidden = group.hidden
    ctx = hidden.shape[1]
    k = k_cache.index_select(0, group.blocks).view(batch, ctx, kv_heads, dim)
    v = v_cache.index_select(0, group.blocks).view(batch, ctx, kv_heads, dim)
    # unused slots may hold anything, NaN too: masked scores handle K; V must be zero there
    if group.tail is None:
        v.masked_fill_(hidden[:, :, None, None], 0.0)
    elif group.tail.numel():
        v.view(batch * ctx, kv_heads, dim).index_fill_(0, group.tail, 0.0)
    qg = q.view(batch, kv_heads, size, dim)
    out = q.new_empty(kv_heads, batch, size, dim)
    mask = hidden[:, None, :]
    for h in range(kv_heads):  # per KV head: uniform batch strides, so BLAS reads in place
        scores = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2)).mul_(scale)  # [B, G, ctx]
        scores.masked_fill_(mask, float("-inf"))
        torch.bmm(torch.softmax(scores, dim=-1), v[:, :, h], out=out[h])
    return out.transpose(0, 1).reshape(batch, q_heads, dim)
