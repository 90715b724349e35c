"""Attention ops on the paged KV cache: ``store_kv`` and ``paged_attention``.

One entry point per op validates its inputs on the host, then runs the Triton kernels
(:mod:`servekit.ops.triton`) for CUDA tensors and the torch reference
(:mod:`servekit.ops.reference`) elsewhere. ``backend=`` or the ``SERVEKIT_OPS_BACKEND``
environment variable (``auto``, ``triton``, ``reference``) forces one; forcing ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1`` set before triton is first imported (the test mode).

Example::

    store_kv(key, value, k_cache, v_cache, slot_mapping)
    out = paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                          scale=head_dim**-0.5)
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

import torch

from servekit.ops._validate import (
    FP8_DTYPE,
    BackendUnavailableError,
    OpDtypeError,
    OpInputError,
    check_paged_attention,
    check_store_kv,
)
from servekit.ops.reference import AttentionInputError

__all__ = [
    "AttentionInputError",
    "BackendUnavailableError",
    "OpDtypeError",
    "OpInputError",
    "paged_attention",
    "store_kv",
]

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV = "SERVEKIT_OPS_BACKEND"


def _load(name: str) -> ModuleType:
    # imported on first use: triton is optional off Linux and slow to import
    return importlib.import_module(f"servekit.ops.{name}")


def _backend(device: torch.device, backend: Backend | None, cache_dtype: torch.dtype) -> ModuleType:
    choice = backend or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in _BACKENDS:
        raise OpInputError("backend", f"expected one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "reference"
    if choice == "reference":
        if cache_dtype == FP8_DTYPE:
            raise OpDtypeError("k_cache", "a float8_e4m3fn cache needs the Triton backend")
        return _load("reference")
    try:
        kernels = _load("triton")
    except ImportError as exc:
        raise BackendUnavailableError(f"the Triton backend needs triton installed: {exc}") from exc
    if device.type != "cuda" and not kernels.INTERPRET:
        raise BackendUnavailableError(
            f"the Triton backend needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 "
            "set before triton is imported"
        )
    return kernels


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    backend: Backend | None = None,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the paged caches.

    Token ``t`` goes to slot ``slot_mapping[t] = block * block_size + offset``; slot -1 is
    skipped. A ``float8_e4m3fn`` cache (Triton only) stores ``x / k_scale`` (``v_scale``),
    rounded to nearest even and saturated at 448.
    """
    check_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    impl = _backend(k_cache.device, backend, k_cache.dtype)
    if k_cache.dtype == FP8_DTYPE:
        impl.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    else:
        impl.store_kv(key, value, k_cache, v_cache, slot_mapping)


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
    backend: Backend | None = None,
) -> torch.Tensor:
    """Causal attention of packed query rows over their paged context (``docs/contracts.md``).

    Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``, the last tokens
    of its ``seq_lens[b]``-token context, whose K/V are already stored. With ``sliding_window W``
    a query at position ``p`` sees keys ``k`` with ``p - W < k <= p``. When there are as many
    query rows as sequences, each sequence must own exactly one (the decode kernel runs).
    Returns ``[num_tokens, num_q_heads, head_dim]`` in ``query``'s dtype (``out`` when given).
    ``k_scale``/``v_scale`` dequantise a ``float8_e4m3fn`` cache (Triton only).
    """
    check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                          scale, sliding_window, out, k_scale, v_scale)  # fmt: skip
    impl = _backend(query.device, backend, k_cache.dtype)
    if k_cache.dtype == FP8_DTYPE:
        result: torch.Tensor = impl.paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
            scale=float(scale), sliding_window=sliding_window, out=out,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    else:
        result = impl.paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
            scale=float(scale), sliding_window=sliding_window, out=out,
        )  # fmt: skip
    return result
