"""Host-side checks of the ops' inputs (shapes, dtypes, devices), shared by every backend.

Kernels cannot report bad input (``tl.device_assert`` does nothing in the interpreter and costs
time on a GPU), so the dispatch checks everything that is known without a device sync. Values
inside tensors (slots, block ids, lengths) are the caller's contract and are not read.
"""

from __future__ import annotations

import math
import numbers

import torch

from servekit.errors import ServekitError
from servekit.ops.reference import AttentionInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
INDEX_DTYPES = (torch.int32, torch.int64)


class OpInputError(AttentionInputError):
    """An attention-op input has the wrong shape, device or value; ``field`` names it.

    A ``ValueError`` (through the reference's ``AttentionInputError``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OpDtypeError(OpInputError, TypeError):
    """An attention-op input has a dtype the op (or the chosen backend) does not support."""


class BackendUnavailableError(ServekitError, RuntimeError):
    """The requested backend cannot run here (e.g. Triton on CPU tensors without the interpreter)."""


def _tensor(field: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise OpInputError(field, f"expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise OpInputError(field, f"expected {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for field, t in tensors.items():
        if t.device != device:
            raise OpInputError(field, f"is on {t.device}, expected {device}")


def _same_shape(field: str, t: torch.Tensor, ref_field: str, ref: torch.Tensor) -> None:
    """Raise unless ``t`` (``field``) has the shape of ``ref`` (``ref_field``)."""
    if t.shape != ref.shape:
        raise OpInputError(
            field, f"shape {tuple(t.shape)} differs from {ref_field}'s {tuple(ref.shape)}"
        )


def _same_dtype(field: str, t: torch.Tensor, ref_field: str, ref: torch.Tensor) -> None:
    """Raise unless ``t`` (``field``) has the dtype of ``ref`` (``ref_field``)."""
    if t.dtype != ref.dtype:
        raise OpDtypeError(field, f"dtype {t.dtype} differs from {ref_field}'s {ref.dtype}")


def _index(field: str, value: object, ndim: int, device: torch.device) -> torch.Tensor:
    t = _tensor(field, value, ndim)
    if t.dtype not in INDEX_DTYPES:
        raise OpDtypeError(field, f"expected int32 or int64, got {t.dtype}")
    _same_device(device, **{field: t})
    return t


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a K/V cache pair; return ``(num_blocks, block_size, num_kv_heads, head_dim)``."""
    k = _tensor("k_cache", k_cache, 4)
    v = _tensor("v_cache", v_cache, 4)
    _same_shape("v_cache", v, "k_cache", k)
    _same_dtype("v_cache", v, "k_cache", k)
    if k.dtype not in (*FLOAT_DTYPES, FP8_DTYPE):
        raise OpDtypeError(
            "k_cache", f"expected float32, float16, bfloat16 or float8_e4m3fn, got {k.dtype}"
        )
    _same_device(k.device, v_cache=v)
    if min(k.shape[1:]) <= 0:
        raise OpInputError(
            "k_cache",
            f"block_size, num_kv_heads and head_dim must be positive, got {tuple(k.shape)}",
        )
    nb, bs, h, d = k.shape
    return nb, bs, h, d


def check_scales(cache_dtype: torch.dtype, k_scale: float, v_scale: float) -> None:
    """fp8 scales must be finite and positive; other caches take no scale (1.0)."""
    for field, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if cache_dtype == FP8_DTYPE:
            if not (math.isfinite(s) and s > 0):
                raise OpInputError(field, f"must be finite and positive, got {s}")
        elif s != 1.0:
            raise OpInputError(field, f"applies only to a float8_e4m3fn cache, not {cache_dtype}")


def check_store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: float, v_scale: float,
) -> None:  # fmt: skip
    """Validate the arguments of ``store_kv`` (see ``docs/contracts.md``)."""
    _, _, num_kv_heads, head_dim = check_caches(k_cache, v_cache)
    k = _tensor("key", key, 3)
    v = _tensor("value", value, 3)
    if k.shape[1:] != (num_kv_heads, head_dim):
        raise OpInputError(
            "key",
            f"shape {tuple(k.shape)} does not match the cache's [*, {num_kv_heads}, {head_dim}]",
        )
    _same_shape("value", v, "key", k)
    if k.dtype not in FLOAT_DTYPES:
        raise OpDtypeError("key", f"expected float32, float16 or bfloat16, got {k.dtype}")
    _same_dtype("value", v, "key", k)
    if k_cache.dtype not in (k.dtype, FP8_DTYPE):
        raise OpDtypeError("k_cache", f"dtype {k_cache.dtype} differs from key's {k.dtype}")
    _same_device(k_cache.device, key=k, value=v)
    slots = _index("slot_mapping", slot_mapping, 1, k_cache.device)
    if slots.shape[0] != k.shape[0]:
        raise OpInputError("slot_mapping", f"has {slots.shape[0]} slots for {k.shape[0]} tokens")
    check_scales(k_cache.dtype, k_scale, v_scale)


def check_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
    scale: float, sliding_window: int | None, out: torch.Tensor | None,
    k_scale: float, v_scale: float,
) -> None:  # fmt: skip
    """Validate the arguments of ``paged_attention`` (see ``docs/contracts.md``)."""
    _, _, num_kv_heads, head_dim = check_caches(k_cache, v_cache)
    q = _tensor("query", query, 3)
    if q.dtype not in FLOAT_DTYPES:
        raise OpDtypeError("query", f"expected float32, float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype not in (q.dtype, FP8_DTYPE):
        raise OpDtypeError("k_cache", f"dtype {k_cache.dtype} differs from query's {q.dtype}")
    if q.shape[2] != head_dim:
        raise OpInputError("query", f"head_dim {q.shape[2]} differs from the cache's {head_dim}")
    if q.shape[1] == 0 or q.shape[1] % num_kv_heads:
        raise OpInputError(
            "query",
            f"{q.shape[1]} query heads is not a positive multiple of {num_kv_heads} KV heads",
        )
    _same_device(k_cache.device, query=q)
    tables = _index("block_tables", block_tables, 2, q.device)
    num_seqs = tables.shape[0]
    lens = _index("seq_lens", seq_lens, 1, q.device)
    if lens.shape[0] != num_seqs:
        raise OpInputError("seq_lens", f"has {lens.shape[0]} entries for {num_seqs} sequences")
    starts = _index("query_start_loc", query_start_loc, 1, q.device)
    if starts.shape[0] != num_seqs + 1:
        raise OpInputError(
            "query_start_loc",
            f"has {starts.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}",
        )
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise OpInputError("scale", f"must be a finite float, got {scale!r}")
    if sliding_window is not None and (
        not isinstance(sliding_window, numbers.Integral) or sliding_window < 1
    ):
        raise OpInputError(
            "sliding_window", f"must be None or a positive int, got {sliding_window!r}"
        )
    if out is not None:
        o = _tensor("out", out, 3)
        _same_shape("out", o, "query", q)
        _same_dtype("out", o, "query", q)
        _same_device(q.device, out=o)
    check_scales(k_cache.dtype, k_scale, v_scale)
