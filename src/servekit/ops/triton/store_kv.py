"""Triton kernel writing new K/V rows into the paged cache by slot mapping (slot -1 skipped)."""

# Triton kernel parameters are untyped by nature (pointers, constexprs); the launchers are typed.
# mypy: allow-untyped-decorators, disable-error-code="no-untyped-def"

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servekit.ops.triton._config import FP8_DTYPE, quantize_e4m3, upcast


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale, v_scale, num_heads, head_dim,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)

    k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if QUANT:
        k = quantize_e4m3(k.to(tl.float32), k_scale)
        v = quantize_e4m3(v.to(tl.float32), v_scale)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + d * stride_kcd
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + d * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write ``key``/``value`` rows ``[T, H, D]`` into ``[num_blocks, block_size, H, D]`` caches.

    Row ``t`` goes to slot ``slot_mapping[t]`` (``block * block_size + offset``); slot -1 is
    skipped. With an fp8 (e4m3fn) cache the rows are stored as ``x / scale`` rounded to nearest
    even and saturated. Inputs are not validated here: ``servekit.ops.store_kv`` does that.
    """
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    quant = k_cache.dtype == FP8_DTYPE
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        float(k_scale), float(v_scale), num_heads, head_dim,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=quant,
        UPCAST=upcast(key.dtype),
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )  # fmt: skip
