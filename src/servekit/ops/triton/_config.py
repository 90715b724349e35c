"""Launch configuration shared by the Triton kernels: interpreter detection, tile sizes, SM count.

Under ``TRITON_INTERPRET=1`` (the CPU test mode) kernels get small fixed tiles and an ``UPCAST``
flag that turns bf16/fp8 into fp32 right after loading (the interpreter computes bf16 wrongly).
On CUDA they get one fixed, tuned-by-hand configuration per kernel: no autotune sweep.
"""

# Triton kernel parameters are untyped by nature (pointers, constexprs); the launchers are typed.
# mypy: allow-untyped-decorators, disable-error-code="no-untyped-def"

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

#: Read once, like triton itself, which decides at ``@triton.jit`` time whether to interpret.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite value of float8 e4m3fn.
FP8_MAX = 448.0
#: log2(e): the attention kernels fold it into the score scale and use ``exp2``.
LOG2E = 1.4426950408889634


def upcast(dtype: torch.dtype) -> bool:
    """Whether loaded values of ``dtype`` must be widened to fp32 (interpreter, bf16/fp8 only)."""
    return INTERPRET and dtype in (torch.bfloat16, FP8_DTYPE)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 operands (and upcast ones), tf32 otherwise."""
    return "ieee" if INTERPRET or dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small constant off CUDA (interpreter tests)."""
    if device.type == "cuda":
        sms: int = torch.cuda.get_device_properties(device).multi_processor_count
        return sms
    return 4


def block_d(head_dim: int) -> int:
    """Power-of-two tile width covering ``head_dim`` (at least 16, the ``tl.dot`` minimum)."""
    return max(16, int(triton.next_power_of_2(head_dim)))


@triton.jit
def quantize_e4m3(x, scale):
    """fp32 ``x / scale`` rounded to nearest-even onto the float8 e4m3fn grid, saturating at 448.

    The rounding is done in fp32 so that the final cast is exact: the interpreter's own fp32 to
    fp8 conversion mis-rounds across exponent boundaries and in the subnormal range.
    """
    x = tl.clamp(x / scale, -448.0, 448.0)
    bits = x.to(tl.int32, bitcast=True)
    # keep 3 mantissa bits (normal range): add half an ulp minus one, plus the lsb for ties-even
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    # subnormal range (|x| < 2^-6): fp32 addition of 1.5 * 2^14 rounds to multiples of 2^-9;
    # done on |x| and signed afterwards so that tiny negatives keep their -0
    magnitude = (tl.abs(x) + 24576.0) - 24576.0
    subnormal = tl.where(x < 0, -magnitude, magnitude)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)
