"""Attention ops on the paged KV cache: ``store_kv``, ``plan_attention`` and ``paged_attention``.

One entry point per op validates its inputs on the host, then dispatches: the Triton kernels
(:mod:`servekit.ops.triton`) for CUDA tensors; on CPU the planned backend
(:mod:`servekit.ops.cpu`) when the call carries a ``plan``, else the torch reference
(:mod:`servekit.ops.reference`, the stateless oracle). ``backend=`` or the
``SERVEKIT_OPS_BACKEND`` environment variable (``auto``, ``triton``, ``cpu``, ``reference``)
forces one; forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is
first imported (the test mode).

Example::

    plan = plan_attention(block_tables_np, seq_lens_np, query_start_loc_np,
                          block_size=16)                     # once per step, host arrays
    store_kv(key, value, k_cache, v_cache, slot_mapping)    # then per layer
    out = paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                          scale=head_dim**-0.5, plan=plan)
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

from servekit._optional import require

require("torch", "engine")
import torch

from servekit.ops import cpu, reference
from servekit.ops._validate import (
    FP8_DTYPE,
    BackendUnavailableError,
    OpDtypeError,
    OpInputError,
    check_paged_attention,
    check_store_kv,
)
from servekit.ops.plan import AttentionPlan, check_plan, plan_attention
from servekit.ops.reference import AttentionInputError

__all__ = [
    "AttentionInputError",
    "AttentionPlan",
    "BackendUnavailableError",
    "OpDtypeError",
    "OpInputError",
    "paged_attention",
    "plan_attention",
    "store_kv",
]

Backend = Literal["auto", "triton", "cpu", "reference"]
_BACKENDS = ("auto", "triton", "cpu", "reference")
BACKEND_ENV = "SERVEKIT_OPS_BACKEND"


def _load(name: str) -> ModuleType:
    # imported on first use: triton is optional off Linux and slow to import
    return importlib.import_module(f"servekit.ops.{name}")


def _choose(
    device: torch.device, backend: Backend | None, cache_dtype: torch.dtype, planned: bool
) -> str:
    choice = backend or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in _BACKENDS:
        raise OpInputError("backend", f"expected one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "cpu" if planned else "reference"
    if choice != "triton" and cache_dtype == FP8_DTYPE:
        raise OpDtypeError("k_cache", "a float8_e4m3fn cache needs the Triton backend")
    return choice


def _triton(device: torch.device) -> ModuleType:
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
    if _choose(k_cache.device, backend, k_cache.dtype, planned=False) != "triton":
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)  # the CPU backend's too
        return
    kernels = _triton(k_cache.device)
    if k_cache.dtype == FP8_DTYPE:
        kernels.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    else:
        kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)


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
    plan: AttentionPlan | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Causal attention of packed query rows over their paged context (``docs/contracts.md``).

    Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``, the last tokens
    of its ``seq_lens[b]``-token context, whose K/V are already stored. With ``sliding_window W``
    a query at position ``p`` sees keys ``k`` with ``p - W < k <= p``. Without a ``plan``, when
    there are as many query rows as sequences, each sequence must own exactly one (the decode
    kernel runs). ``plan`` (from :func:`plan_attention` on the same step's host metadata and
    window) lets every layer skip the per-call host work: CPU tensors then run the planned CPU
    backend. Returns ``[num_tokens, num_q_heads, head_dim]`` in ``query``'s dtype (``out`` when
    given). ``k_scale``/``v_scale`` dequantise a ``float8_e4m3fn`` cache (Triton only).
    """
    check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                          scale, sliding_window, out, k_scale, v_scale)  # fmt: skip
    if plan is not None:
        plan = check_plan(plan, query, k_cache, block_tables, sliding_window)
    choice = _choose(query.device, backend, k_cache.dtype, planned=plan is not None)
    if choice == "cpu":
        if plan is None:
            raise OpInputError("plan", "the cpu backend runs a plan: pass plan=plan_attention(...)")
        if plan.cpu is None:
            raise OpInputError("plan", f"was made for {plan.device}, not for CPU tensors")
        return cpu.paged_attention(query, k_cache, v_cache, plan.cpu, scale=float(scale), out=out)
    if choice == "reference":
        return reference.paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
            scale=float(scale), sliding_window=sliding_window, out=out,
        )  # fmt: skip
    hints = {} if plan is None else {"decode": plan.decode, "max_context": plan.max_context}
    result: torch.Tensor = _triton(query.device).paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale=float(scale), sliding_window=sliding_window, out=out,
        k_scale=k_scale, v_scale=v_scale, **hints,
    )  # fmt: skip
    return result
