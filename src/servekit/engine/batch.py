"""Pack one step's scheduled sequences into flat arrays: ids, positions, slots, block tables.

Any mix of prefill chunks and decodes becomes one packed batch. The work is numpy over whole
arrays; Python loops only over sequences (to slice their token lists and block tables), never
over tokens. Buffers for block tables are reused across steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt
from attrs import define

__all__ = ["PackedBatch", "PackedBatchBuilder"]

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


@define(slots=True)
class PackedBatch:
    """The flat inputs of one forward pass.

    ``logits_indices`` are the rows (last token of each sequence that samples this step) whose
    logits are computed; ``sample_rows`` maps them back to the sequences' batch positions.
    """

    input_ids: I64
    positions: I64
    slot_mapping: I64
    block_tables: I32
    seq_lens: I32
    query_start_loc: I32
    logits_indices: I64
    sample_rows: I64


class PackedBatchBuilder:
    """Builds :class:`PackedBatch` es for a cache of ``block_size``-token blocks."""

    __slots__ = ("_block_size", "_tables")

    def __init__(self, block_size: int, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self._block_size = block_size
        self._tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)

    def build(
        self,
        token_ids: Sequence[Sequence[int]],
        block_ids: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        num_new: Sequence[int],
        sample: Sequence[bool],
    ) -> PackedBatch:
        """Pack sequences whose tokens ``[num_computed[i], num_computed[i] + num_new[i])`` run now."""
        n = len(token_ids)
        bs = self._block_size
        start = np.asarray(num_computed, dtype=np.int64)
        new = np.asarray(num_new, dtype=np.int64)
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(new, out=cu[1:])
        total = int(cu[-1])
        if total == n:  # decode-only step: one token per sequence
            ids = np.fromiter(
                (t[s] for t, s in zip(token_ids, num_computed, strict=True)), np.int64, n)
            positions = start
            seq_of_token = np.arange(n)
        else:
            ids = np.fromiter(
                chain.from_iterable(t[s : s + k] for t, s, k
                                    in zip(token_ids, num_computed, num_new, strict=True)),
                np.int64, total,
            )
            seq_of_token = np.repeat(np.arange(n), new)
            positions = np.arange(total, dtype=np.int64) - (cu[:-1] - start)[seq_of_token]
        width = max(len(b) for b in block_ids) if n else 0
        if width > self._tables.shape[1] or n > self._tables.shape[0]:
            self._tables = np.zeros((max(n, self._tables.shape[0]), max(width, self._tables.shape[1])),
                                    dtype=np.int32)
        tables = self._tables[:n, :width]
        for row, blocks in enumerate(block_ids):
            k = len(blocks)
            tables[row, :k] = blocks
            tables[row, k:] = 0
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        flags = np.asarray(sample, dtype=bool)
        sample_rows = np.flatnonzero(flags)
        return PackedBatch(
            input_ids=ids, positions=positions, slot_mapping=slots, block_tables=tables,
            seq_lens=(start + new).astype(np.int32), query_start_loc=cu.astype(np.int32),
            logits_indices=cu[1:][flags] - 1, sample_rows=sample_rows,
        )
