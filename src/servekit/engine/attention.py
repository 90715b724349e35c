"""servekit's paged attention as a transformers attention implementation.

:func:`register` adds ``"servekit_paged"`` to transformers' ``AttentionInterface``; a model
loaded with ``from_pretrained(..., attn_implementation="servekit_paged")`` then calls
:func:`paged_attention_forward` in every attention layer. The name is deliberately *not*
registered with ``AttentionMaskInterface``: transformers' mask builders then return ``None``
(the path it keeps for vLLM/TGI backends), so no dense mask is ever built.

The per-step metadata travels in an :class:`AttentionMetadata` owned by the model runner and
handed to ``model.forward`` as the ``servekit_attention`` keyword, which transformers forwards
to each attention call. It carries the step's ``servekit.ops`` attention plan (one per sliding
window, made on first use), so the layers only run ``ops.store_kv`` and
``ops.paged_attention(..., plan=plan)``. Nothing is global but the name registration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from attrs import define, field

from servekit import ops
from servekit.errors import ServekitError

__all__ = ["ATTENTION_NAME", "METADATA_KWARG", "AttentionMetadata", "paged_attention_forward", "register"]

#: The ``attn_implementation`` name servekit registers.
ATTENTION_NAME = "servekit_paged"
#: The ``model.forward`` keyword that carries the step's :class:`AttentionMetadata`.
METADATA_KWARG = "servekit_attention"


@define(slots=True)
class AttentionMetadata:
    """One packed step: where each token's K/V goes and what each sequence attends to.

    ``k_caches[i]`` / ``v_caches[i]`` are layer ``i``'s ``[num_blocks, block_size, kv_heads,
    head_dim]`` tensors; ``slot_mapping`` ``[num_tokens]``; ``block_tables`` int32
    ``[num_seqs, max_blocks]``; ``seq_lens`` int32 ``[num_seqs]`` (context incl. this step);
    ``query_start_loc`` int32 ``[num_seqs + 1]``. ``planner`` makes the step's
    :class:`servekit.ops.AttentionPlan` for a sliding window (None: full attention) from the
    host-side metadata; :meth:`plan` calls it once per distinct window per step. Without a
    planner every layer calls ``ops.paged_attention`` stateless.
    """

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    planner: Callable[[int | None], ops.AttentionPlan] | None = None
    plans: dict[int | None, ops.AttentionPlan] = field(factory=dict)

    def plan(self, sliding_window: int | None) -> ops.AttentionPlan | None:
        """The step's plan for ``sliding_window`` (made on first use), or None without a planner."""
        if self.planner is None:
            return None
        plan = self.plans.get(sliding_window)
        if plan is None:
            plan = self.plans[sliding_window] = self.planner(sliding_window)
        return plan


class AttentionMetadataMissingError(ServekitError, RuntimeError):
    """The model was called without the runner's ``servekit_attention`` metadata."""


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: store this step's K/V, then paged attention.

    ``query`` is ``[1, q_heads, tokens, head_dim]`` (one packed batch), ``key``/``value``
    ``[1, kv_heads, tokens, head_dim]``. Returns ``([1, tokens, q_heads, head_dim], None)``.
    """
    meta: AttentionMetadata | None = kwargs.get(METADATA_KWARG)
    if meta is None:
        raise AttentionMetadataMissingError(
            f"{ATTENTION_NAME} attention needs the {METADATA_KWARG}= keyword in model.forward"
        )
    layer = int(getattr(module, "layer_idx", 0))
    k_cache, v_cache = meta.k_caches[layer], meta.v_caches[layer]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    q = query[0].transpose(0, 1)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    window = int(window) if window else None
    out = ops.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale=float(scaling), sliding_window=window, plan=meta.plan(window),
    )
    return out.unsqueeze(0), None


def register() -> str:
    """Register servekit's paged attention with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
