"""What the decode and prefill kernels share: the KV-tile load and the online-softmax step."""

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


@triton.jit
def attend_tile(q, k, v, allowed, qk_scale, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one KV tile into the online softmax: returns the new ``(m_i, l_i, acc)``.

    Scores are ``q @ k^T * qk_scale`` (base 2), ``-inf`` where ``allowed`` is False; ``m_i`` is
    the running row max, ``l_i`` the running sum of ``exp2(s - m_i)``, ``acc`` the unnormalised
    output.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
