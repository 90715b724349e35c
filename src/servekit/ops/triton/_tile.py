"""The KV-tile load that the decode and prefill kernels share."""

# Triton kernel parameters are untyped by nature (pointers, constexprs).
# mypy: allow-untyped-decorators, disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    table, k_cache_ptr, v_cache_ptr, pos, valid, d, d_mask, kv_head, q,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    k_scale, v_scale,
    BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr, KV_SCALED: tl.constexpr,
):
    """K and V ``[BLOCK_N, BLOCK_D]`` at context positions ``pos`` through the block table.

    Invalid rows read 0. bf16/fp8 are upcast to fp32 when ``UPCAST`` (the interpreter computes
    them wrongly); an fp8 cache is dequantised by its per-tensor scale into ``q``'s dtype.
    """
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offset = pos % BLOCK_SIZE
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(
        k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks
        + kv_head * stride_kh + d[None, :] * stride_kd,
        mask=kv_mask, other=0.0,
    )  # fmt: skip
    v = tl.load(
        v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs
        + kv_head * stride_vh + d[None, :] * stride_vd,
        mask=kv_mask, other=0.0,
    )  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if KV_SCALED:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    return k, v
