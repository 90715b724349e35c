"""A model runner with no model: deterministic tokens, and a step time from a cost model.

:class:`CostModelRunner` lets the real engine (scheduler, KV manager and prefix cache, sampler,
KV events) run on a machine that cannot run the model, with steps that take as long as a model's
would. Each step sleeps (the GIL released: several replicas share a few cores)

    base_s + prefill_token_s * prefill tokens + decode_row_s * decode rows

where decode rows are the sequences that run one token this step and prefill tokens are the
tokens of the others; prompt tokens found in the prefix cache are never scheduled, so cache
hits shorten steps as on a real model. The token sampled for a sequence is a function of its
length only (``TEXT[seq_len % len(TEXT)]``, bytes of a fixed sentence): outputs do not depend
on batching, caching or sampling settings, and a resumed request continues identically.
``servekit serve --fake-model-cost '{"prefill_token_s": 2e-5}'`` serves it with the fake
engine's byte-level tokenizer (:class:`servekit.server.fake.FakeTokenizer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from servekit.engine.batch import PackedBatch
from servekit.sched.params import InvalidParameterError

__all__ = ["TEXT", "CostModelRunner"]

#: The bytes the runner's tokens cycle through (the fake engine's sentence).
TEXT = b"the quick brown fox jumps over the lazy dog "
_BLOCK_BYTES = 64 * 2**10  # nominal KV bytes per block, to size the cache from a byte budget


class CostModelRunner:
    """A :class:`~servekit.engine.runner.Runner` whose step time follows a cost model.

    ``num_blocks`` KV blocks (else ``kv_cache_bytes // block_bytes``); ``vocab_size`` must
    cover the tokenizer's ids (258 for the byte-level one; no token is an end of sequence, so
    requests run to ``max_tokens``). ``sleep`` is injectable for tests. ``steps``,
    ``prefill_tokens`` and ``busy_s`` count what it ran and the time it charged.
    """

    api_version = 1

    def __init__(self, model: Any = None, *, base_s: float = 0.002,
                 prefill_token_s: float = 2e-5, decode_row_s: float = 1e-4,
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, block_bytes: int = _BLOCK_BYTES,
                 max_model_len: int = 8192, vocab_size: int = 258,
                 device: str | torch.device = "cpu", dtype: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        for name, value in (("base_s", base_s), ("prefill_token_s", prefill_token_s),
                            ("decode_row_s", decode_row_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidParameterError(name, f"must be a number of seconds >= 0, got {value!r}")
        if num_blocks is None:
            num_blocks = (kv_cache_bytes or 256 * 2**20) // block_bytes
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise InvalidParameterError("num_blocks", f"must be an integer >= 1, got {num_blocks!r}")
        if vocab_size < 256:
            raise InvalidParameterError("vocab_size", f"must be at least 256, got {vocab_size!r}")
        self.base_s, self.prefill_token_s, self.decode_row_s = base_s, prefill_token_s, decode_row_s
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids: frozenset[int] = frozenset()
        self._sleep = sleep
        self._table = torch.tensor(list(TEXT), dtype=torch.int64)
        self.steps = 0
        self.prefill_tokens = 0
        self.busy_s = 0.0

    def step_seconds(self, batch: PackedBatch) -> float:
        """The time the cost model charges for ``batch``."""
        lengths = np.diff(batch.query_start_loc)
        decode_rows = int(np.count_nonzero(lengths == 1))
        prefill = int(lengths.sum()) - decode_rows
        self.prefill_tokens += prefill
        return self.base_s + self.prefill_token_s * prefill + self.decode_row_s * decode_rows

    def execute(self, batch: PackedBatch) -> torch.Tensor:
        """Sleep the step's cost; logits that make every sampled row pick its next byte."""
        seconds = self.step_seconds(batch)
        self.steps += 1
        self.busy_s += seconds
        if seconds > 0:
            self._sleep(seconds)
        rows = torch.from_numpy(batch.sample_rows.astype(np.int64, copy=False))
        lengths = torch.from_numpy(batch.seq_lens.astype(np.int64))[rows]
        tokens = self._table[lengths % len(TEXT)]
        logits = torch.full((len(tokens), self.vocab_size), -1e9, dtype=torch.float32)
        logits[torch.arange(len(tokens)), tokens] = 0.0
        return logits
