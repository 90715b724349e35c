"""The model runner: the :class:`Runner` interface, and :class:`ModelRunner`, a transformers
causal LM on servekit's paged KV cache, one packed step.

A runner is a ``runner`` plugin (interface version 1, see :mod:`servekit.plugins`): any object
that owns a model and its KV cache and turns one :class:`~servekit.engine.batch.PackedBatch`
into logits, so a team can serve a model that is not a transformers model (an already-compiled
module, a remote accelerator) with servekit's scheduler, KV manager, sampler and server:
``LLMEngine(my_runner, tokenizer=...)``.

:class:`ModelRunner` loads a local model directory with ``from_pretrained`` and servekit's attention
implementation, allocates the per-layer K/V tensors (sized from a byte budget or a block
count), and runs one forward per step over a :class:`~servekit.engine.batch.PackedBatch`,
returning the logits of only the rows that sample.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from servekit import ops
from servekit.engine import attention
from servekit.engine.batch import PackedBatch
from servekit.engine.kv_cache import KVCache
from servekit.errors import ServekitError

__all__ = ["ModelRunner", "Runner", "UnsupportedModelError", "kv_cache_dims"]


@runtime_checkable
class Runner(Protocol):
    """What the engine needs of a model runner (interface version 1).

    Contract: the runner owns ``num_blocks`` KV blocks of the engine's ``block_size`` tokens
    (ids ``0 .. num_blocks - 1``, handed out by the engine's KV manager; it may keep more, e.g.
    a null block for padding). :meth:`execute` runs one packed step: for every token of
    ``batch.input_ids`` at ``batch.positions``, write its K/V into the slot
    ``batch.slot_mapping`` gives (``-1``: padding, skip) and attend over its sequence's blocks
    (``batch.block_tables``, ``batch.seq_lens``, ``batch.query_start_loc``), then return the
    float32 logits ``[len(batch.logits_indices), vocab_size]`` of the rows
    ``batch.logits_indices`` names, on ``device``. It may assume that blocks registered as
    cached keep their K/V. ``max_model_len`` is the longest sequence it supports and
    ``eos_token_ids`` the tokens that end generation (the engine adds the tokenizer's).
    """

    device: torch.device
    vocab_size: int
    num_blocks: int
    max_model_len: int
    eos_token_ids: frozenset[int]

    def execute(self, batch: PackedBatch) -> torch.Tensor:
        """Run one packed step; float32 logits of the sampled rows."""
        ...


class UnsupportedModelError(ServekitError, ValueError):
    """The model cannot run on servekit's attention (no attention-interface support)."""


class ModelRunner:
    """A transformers causal LM and its KV tensors (a :class:`Runner`); :meth:`execute` runs
    one packed step."""

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        plan_attention: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.block_size = block_size
        #: plan attention once per step (``servekit.ops.plan_attention``); False: every layer
        #: calls ``ops.paged_attention`` stateless (on CPU, the reference)
        self.use_plan = plan_attention
        name = attention.register()
        if isinstance(model, torch.nn.Module):
            loaded: Any = model
            loaded.set_attn_implementation(name)
            self.model: Any = loaded
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                str(model), attn_implementation=name,
                dtype=dtype if dtype is not None else "auto",
            )
        if not getattr(self.model, "_supports_attention_backend", False):
            raise UnsupportedModelError(
                f"model: {type(self.model).__name__} does not support transformers' attention interface"
            )
        self.model.to(self.device).eval().requires_grad_(False)
        self.config = self.model.config
        self.dtype: torch.dtype = next(self.model.parameters()).dtype
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_model_len = int(getattr(self.config, "max_position_embeddings", 2048))
        self.eos_token_ids = frozenset(_eos_ids(self.model))
        layers, kv_heads, head_dim = kv_cache_dims(self.config)
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("num_blocks: give num_blocks or kv_cache_bytes to size the KV cache")
            per_block = KVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, self.dtype)
            num_blocks = kv_cache_bytes // per_block - 1  # one block is the null block
        if num_blocks < 1:
            raise ValueError(f"num_blocks: the KV cache needs at least one block, got {num_blocks}")
        #: blocks the KV manager hands out; block ``num_blocks`` (the null block) stays zero
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        self.kv_cache = KVCache(layers, num_blocks + 1, block_size, kv_heads, head_dim,
                                dtype=self.dtype, device=self.device)

    def execute(self, batch: PackedBatch) -> torch.Tensor:
        """Run the model on ``batch``; return float32 logits ``[len(logits_indices), vocab]``."""
        dev = self.device
        meta = attention.AttentionMetadata(
            k_caches=self.kv_cache.key_caches, v_caches=self.kv_cache.value_caches,
            slot_mapping=_to(batch.slot_mapping, dev),
            block_tables=_to(batch.block_tables, dev),
            seq_lens=_to(batch.seq_lens, dev),
            query_start_loc=_to(batch.query_start_loc, dev),
        )
        if self.use_plan:
            meta.planner = partial(self._plan, batch)
        with torch.inference_mode():
            out = self.model(
                input_ids=_to(batch.input_ids, dev).unsqueeze(0),
                position_ids=_to(batch.positions, dev).unsqueeze(0),
                use_cache=False,
                logits_to_keep=_to(batch.logits_indices, dev),
                **{attention.METADATA_KWARG: meta},
            )
        logits: torch.Tensor = out.logits[0]
        return logits.float()

    def _plan(self, batch: PackedBatch, sliding_window: int | None) -> ops.AttentionPlan:
        """The step's attention plan for one sliding window, from the packed host arrays."""
        return ops.plan_attention(
            batch.block_tables, batch.seq_lens, batch.query_start_loc,
            block_size=self.block_size, sliding_window=sliding_window,
            null_block=self.null_block, device=self.device,
        )  # fmt: skip



def kv_cache_dims(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", heads)), int(head_dim)


def _eos_ids(model: Any) -> set[int]:
    """The end-of-sequence ids a transformers model's generation config and config name."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def _to(array: Any, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
