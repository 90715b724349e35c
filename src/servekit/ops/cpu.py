"""The CPU backend of ``servekit.ops.paged_attention``: planned once per step, run per layer.

The stateless reference (:mod:`servekit.ops.reference`) reads lengths back, builds masks and
gathers every sequence's whole context on each call; for a small model that costs more than the
math. Here the host-side work is done once per step by :func:`plan_cpu` (called through
``servekit.ops.plan_attention``) and each layer only runs tensor ops:

* decode rows (one query per sequence), sorted by length into a few groups so padding stays
  small: one ``index_select`` of each group's blocks, a batched matmul per KV head that reads
  the gathered K/V in place, masks built at plan time; with a ``null_block`` (a block that is
  all zeros and never written) padding reads it, so only the tails of last blocks are zeroed in V;
* a prefill chunk gathers only the blocks its queries can see (from the sliding-window start)
  and runs SDPA: ``is_causal`` when the chunk is its whole context, else a bottom-right causal
  mask built at plan time.

Numerically it matches the reference (fp32 models: same fp32 scores and softmax); tests compare
the two on random paged layouts with NaN in every unused slot.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from attrs import frozen

from servekit.ops.reference import store_kv

__all__ = ["CpuPlan", "paged_attention", "plan_cpu", "store_kv"]

I32 = npt.NDArray[np.int32]
#: Decode rows per length group (at most ``MAX_DECODE_GROUPS`` groups).
DECODE_GROUP_SIZE = 16
MAX_DECODE_GROUPS = 4


@frozen(slots=True)
class _Chunk:
    """Query rows [start, end) of one sequence; keys are context positions [k_start, ctx_len)."""

    start: int
    end: int
    offset: int  # k_start minus the first gathered block's first position
    length: int  # ctx_len - k_start keys
    block_ids: torch.Tensor  # long: the blocks holding positions [k_start, ctx_len)
    mask: torch.Tensor | None  # bool [rows, length], True = attend; None: plain causal


@frozen(slots=True)
class _DecodeGroup:
    """Decode rows of similar context length, attended together (padding stays small)."""

    rows: torch.Tensor  # long [b] query rows
    blocks: torch.Tensor  # long [b * nb] block ids, padding = the null block (or the table's)
    hidden: torch.Tensor  # bool [b, nb * block_size], True = not visible
    tail: torch.Tensor | None  # long flat indices of [b * ctx] slots to zero in the gathered V;
    # None: no null block, zero every hidden slot


@frozen(slots=True)
class CpuPlan:
    """The CPU backend's per-step work list: decode groups and prefill chunks."""

    groups: tuple[_DecodeGroup, ...]
    chunks: tuple[_Chunk, ...]


def plan_cpu(
    block_tables: I32,
    seq_lens: I32,
    query_start_loc: I32,
    block_size: int,
    sliding_window: int | None = None,
    null_block: int | None = None,
    group_size: int = DECODE_GROUP_SIZE,
) -> CpuPlan:
    """Plan a step from validated host arrays (see ``servekit.ops.plan_attention``).

    Decodes are sorted by length and split into groups of about ``group_size`` (at most
    ``MAX_DECODE_GROUPS``), so each group pads only to its own longest context.
    """
    q_lens = np.diff(query_start_loc)
    dec = np.flatnonzero(q_lens == 1)
    groups: list[_DecodeGroup] = []
    if dec.size:
        dec = dec[np.argsort(seq_lens[dec], kind="stable")]
        parts = max(1, min(MAX_DECODE_GROUPS, round(dec.size / group_size)))
        for part in np.array_split(dec, parts):
            groups.append(_decode_group(part, block_tables, seq_lens, query_start_loc,
                                        block_size, sliding_window, null_block))  # fmt: skip
    chunks = [
        _chunk(int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b]),
               block_tables[b], block_size, sliding_window)
        for b in np.flatnonzero(q_lens > 1)
    ]  # fmt: skip
    return CpuPlan(tuple(groups), tuple(chunks))


def _chunk(start: int, end: int, ctx: int, table: I32, block_size: int,
           window: int | None) -> _Chunk:  # fmt: skip
    n = end - start
    # the first query (position ctx - n) sees back to ctx - n - window + 1; nothing before counts
    k_start = 0 if window is None else max(0, ctx - n - window + 1)
    first = k_start // block_size
    blocks = torch.from_numpy(table[first : -(-ctx // block_size)].astype(np.int64))
    mask = None
    if k_start > 0 or ctx > n or (window is not None and window < n):
        q_pos = np.arange(ctx - n, ctx)[:, None]
        k_pos = np.arange(k_start, ctx)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= (q_pos - k_pos) < window
        mask = torch.from_numpy(visible)
    return _Chunk(start, end, k_start - first * block_size, ctx - k_start, blocks, mask)


def _decode_group(
    seqs: npt.NDArray[np.intp], block_tables: I32, seq_lens: I32, query_start_loc: I32,
    block_size: int, window: int | None, null_block: int | None,
) -> _DecodeGroup:  # fmt: skip
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
    if window is not None:
        hidden |= pos <= (lens[:, None] - 1 - window)
    return _DecodeGroup(torch.from_numpy(query_start_loc[seqs].astype(np.int64)),
                        torch.from_numpy(blocks.reshape(-1)), torch.from_numpy(hidden), tail)  # fmt: skip


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: CpuPlan,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[T, Hq, D]`` for one layer, as ``plan`` lays the step out.

    Inputs are validated by ``servekit.ops.paged_attention``, not here. Returns ``[T, Hq, D]``
    (``out`` when given).
    """
    q_heads = query.shape[1]
    kv_heads = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    for group in plan.groups:
        out[group.rows] = _decode(group, query.index_select(0, group.rows), k_cache, v_cache,
                                  scale, kv_heads)  # fmt: skip
    gqa = q_heads != kv_heads
    for c in plan.chunks:
        q = query[c.start : c.end].transpose(0, 1)  # [Hq, n, D]
        k = _context(k_cache, c)
        v = _context(v_cache, c)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=c.mask, is_causal=c.mask is None, scale=scale, enable_gqa=gqa
        )
        out[c.start : c.end] = o.transpose(0, 1)
    return out


def _context(cache: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """``[Hkv, length, D]`` keys or values a chunk can see, gathered from its blocks."""
    blocks = cache.index_select(0, chunk.block_ids).flatten(0, 1)
    return blocks[chunk.offset : chunk.offset + chunk.length].transpose(0, 1)


def _decode(group: _DecodeGroup, q: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:  # fmt: skip
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
