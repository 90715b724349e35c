"""Torch reference of the paged attention ops (any device): the CPU path and the kernels' oracle.

Cache layout per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]``;
``slot = block * block_size + offset``, slot -1 = padding. See docs/contracts.md.

``paged_attention`` handles decode rows (one query row per sequence) for the whole batch at once
(gather K/V through the block tables, one batched matmul, masked by length), and prefill chunks
one sequence at a time (causal mask over the cached prefix plus the chunk). Scores and softmax
are computed in fp32 whatever the cache dtype.
"""

from __future__ import annotations

import torch

from servekit.errors import ServekitError

__all__ = ["AttentionInputError", "paged_attention", "store_kv"]


class AttentionInputError(ServekitError, ValueError):
    """A tensor passed to an attention op has the wrong shape (the message names it)."""


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise AttentionInputError(
            f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(cache.shape)}"
        )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping``.

    Slots equal to -1 are skipped (padding).
    """
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    if key.shape != value.shape or key.shape[1:] != k_cache.shape[2:]:
        raise AttentionInputError(
            f"key/value must be [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}], got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise AttentionInputError(
            f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}"
        )
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, offsets] = value.to(v_cache.dtype)


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
) -> torch.Tensor:
    """Causal attention of packed query rows over each sequence's paged K/V.

    Sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b+1]`` of ``query``
    ``[num_tokens, num_q_heads, head_dim]``: the last tokens of its ``seq_lens[b]``-token context,
    whose K/V are already in the cache. The query at position ``p`` sees keys ``k <= p`` (and
    ``p - k < sliding_window`` when given). Returns ``[num_tokens, num_q_heads, head_dim]`` in
    ``query``'s dtype, written into ``out`` when given.
    """
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or num_q_heads % num_kv_heads:
        raise AttentionInputError(
            f"query [{num_tokens}, {num_q_heads}, {head_dim}] does not fit the cache's "
            f"{num_kv_heads} KV heads of dim {kv_dim} (num_q_heads must be a multiple)"
        )
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise AttentionInputError(
            f"query_start_loc must be [{num_seqs + 1}] and block_tables [{num_seqs}, *], got "
            f"{tuple(query_start_loc.shape)} and {tuple(block_tables.shape)}"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise AttentionInputError(f"sliding_window must be positive, got {sliding_window}")
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]
    for b in range(num_seqs):
        if not 0 <= q_lens[b] <= lens[b]:
            raise AttentionInputError(
                f"sequence {b}: {q_lens[b]} query rows but seq_lens[{b}]={lens[b]}"
            )
    tables = block_tables.long()
    decode = [b for b in range(num_seqs) if q_lens[b] == 1]
    if decode:
        rows = torch.tensor([starts[b] for b in decode], device=query.device)
        out[rows] = _decode(
            query[rows], k_cache, v_cache, tables[decode], seq_lens[decode], scale, sliding_window
        ).to(out.dtype)
    for b in range(num_seqs):
        if q_lens[b] > 1:
            num_blocks = -(-lens[b] // block_size)
            ctx_blocks = tables[b, :num_blocks]
            k = k_cache[ctx_blocks].flatten(0, 1)[: lens[b]]
            v = v_cache[ctx_blocks].flatten(0, 1)[: lens[b]]
            out[starts[b] : starts[b + 1]] = _prefill(
                query[starts[b] : starts[b + 1]], k, v, scale, sliding_window
            ).to(out.dtype)
    return out


def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """One sequence: q ``[n, Hq, D]`` are the last n of the L context tokens in k/v ``[L, Hkv, D]``."""
    n, num_q_heads, head_dim = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qf = q.float().view(n, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)  # [Hkv, n, G, D]
    kf = k.float().permute(1, 2, 0)  # [Hkv, D, L]
    vf = v.float().permute(1, 0, 2)  # [Hkv, L, D]
    scores = (qf.reshape(num_kv_heads, n * group, head_dim) @ kf) * scale  # [Hkv, n*G, L]
    q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= q_pos - k_pos >= window
    scores = scores.view(num_kv_heads, n, group, ctx).masked_fill(hidden[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_kv_heads, n * group, ctx)
    o = (probs @ vf).view(num_kv_heads, n, group, head_dim)
    return o.permute(1, 0, 2, 3).reshape(n, num_q_heads, head_dim)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Batched single-row queries: q ``[B, Hq, D]`` at the last position of each context."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    num_blocks = -(-int(lens.max()) // block_size)
    ctx_blocks = tables[:, :num_blocks]
    k = k_cache[ctx_blocks].flatten(1, 2).float()  # [B, L, Hkv, D]
    v = v_cache[ctx_blocks].flatten(1, 2).float()
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    visible = k_pos < lens[:, None]  # [B, L]
    if window is not None:
        visible &= k_pos > lens[:, None] - 1 - window
    # padded positions may hold anything (NaN included): their scores are masked to -inf below,
    # and their values zeroed so that 0 * NaN cannot leak into the output
    v = v.masked_fill(~visible[:, :, None, None], 0.0)
    qf = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = (qf @ k.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v.permute(0, 2, 1, 3)  # [B, Hkv, G, D]
    return o.reshape(batch, num_q_heads, head_dim)
