"""Per-step attention plans: host-side metadata read once, shared by every layer's call.

``plan_attention`` takes the step's block tables, lengths and query offsets as host arrays (numpy
or CPU tensors; the engine packs them in numpy), checks their values (free on the host) and
returns an :class:`AttentionPlan`. ``servekit.ops.paged_attention(..., plan=plan)`` then needs no
device-to-host read: on CPU the plan carries the CPU backend's work list
(:mod:`servekit.ops.cpu`), on CUDA what the Triton launch needs (decode or prefill kernel, the
longest context for the split count). It is the plan/run split of FlashInfer's wrappers.
"""

from __future__ import annotations

import numbers

import numpy as np
import numpy.typing as npt
import torch
from attrs import frozen

from servekit.ops._validate import OpInputError
from servekit.ops.cpu import DECODE_GROUP_SIZE, CpuPlan, plan_cpu

__all__ = ["AttentionPlan", "check_plan", "plan_attention"]

HostArray = npt.NDArray[np.integer] | torch.Tensor


@frozen(slots=True)
class AttentionPlan:
    """One step's attention layout for one sliding window, built by :func:`plan_attention`.

    ``decode`` is True when every sequence owns at most one query row; ``max_context`` bounds
    the keys any query sees (the longest context, or the window plus a block).
    ``cpu`` is the CPU backend's work list (None for a plan made for another device).
    """

    num_seqs: int
    num_tokens: int
    block_size: int
    sliding_window: int | None
    null_block: int | None
    max_seq_len: int
    max_query_len: int
    device: torch.device
    cpu: CpuPlan | None

    @property
    def decode(self) -> bool:
        """Every sequence owns at most one query row (the decode kernel's case)."""
        return self.max_query_len <= 1

    @property
    def max_context(self) -> int:
        """An upper bound on the keys one query attends to."""
        if self.sliding_window is None:
            return self.max_seq_len
        return min(self.max_seq_len, self.sliding_window + self.block_size)


def _host(field: str, value: object, ndim: int) -> npt.NDArray[np.int32]:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise OpInputError(
                field, f"must be on the host (numpy or a CPU tensor), not {value.device}: "
                "planning reads it, and reading device memory would sync"
            )  # fmt: skip
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise OpInputError(
            field, f"expected a numpy array or torch.Tensor, got {type(value).__name__}"
        )
    if value.ndim != ndim:
        raise OpInputError(field, f"expected {ndim} dimensions, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.integer):
        raise OpInputError(field, f"expected an integer dtype, got {value.dtype}")
    return value.astype(np.int32, copy=False)


def _optional_int(field: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise OpInputError(field, f"must be None or an int >= {minimum}, got {value!r}")
    return int(value)


def plan_attention(
    block_tables: HostArray,
    seq_lens: HostArray,
    query_start_loc: HostArray,
    *,
    block_size: int,
    sliding_window: int | None = None,
    null_block: int | None = None,
    device: torch.device | str = "cpu",
    decode_group_size: int = DECODE_GROUP_SIZE,
) -> AttentionPlan:
    """Plan a step's ``paged_attention`` calls from host-side metadata (``docs/contracts.md``).

    The arrays are the host copies of what every layer's call receives (block tables int
    ``[num_seqs, max_blocks]``, ``seq_lens`` ``[num_seqs]``, ``query_start_loc``
    ``[num_seqs + 1]``). ``sliding_window`` must equal the calls'. ``null_block``, when given,
    is a block of the cache that is all zeros and never written; the CPU backend pads with it.
    ``device`` is where the attention runs: the CPU work list is built only for ``"cpu"``.
    ``decode_group_size`` tunes the CPU backend's grouping of decode rows by length.
    """
    tables = _host("block_tables", block_tables, 2)
    lens = _host("seq_lens", seq_lens, 1)
    starts = _host("query_start_loc", query_start_loc, 1)
    num_seqs = tables.shape[0]
    if lens.shape[0] != num_seqs:
        raise OpInputError("seq_lens", f"has {lens.shape[0]} entries for {num_seqs} sequences")
    if starts.shape[0] != num_seqs + 1:
        raise OpInputError(
            "query_start_loc",
            f"has {starts.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}",
        )
    size = _optional_int("block_size", block_size, 1)
    if size is None:
        raise OpInputError("block_size", "must be an int >= 1, got None")
    window = _optional_int("sliding_window", sliding_window, 1)
    null = _optional_int("null_block", null_block, 0)
    _optional_int("decode_group_size", decode_group_size, 1)
    q_lens = np.diff(starts)
    if starts[0] != 0 or (q_lens < 0).any():
        raise OpInputError("query_start_loc", "must start at 0 and never decrease")
    if (q_lens > lens).any():
        b = int(np.flatnonzero(q_lens > lens)[0])
        raise OpInputError(
            "seq_lens", f"sequence {b} has {q_lens[b]} query rows but seq_lens[{b}]={lens[b]}"
        )
    if num_seqs and int((-(-lens.astype(np.int64) // size)).max()) > tables.shape[1]:
        raise OpInputError(
            "block_tables",
            f"{tables.shape[1]} columns do not cover seq_lens of {size}-token blocks",
        )
    dev = torch.device(device)
    cpu = None
    if dev.type == "cpu":
        cpu = plan_cpu(tables, lens, starts, size, window, null, decode_group_size)
    return AttentionPlan(
        num_seqs=num_seqs, num_tokens=int(starts[-1]), block_size=size, sliding_window=window,
        null_block=null, max_seq_len=int(lens.max(initial=0)),
        max_query_len=int(q_lens.max(initial=0)), device=dev, cpu=cpu,
    )  # fmt: skip


def check_plan(
    plan: object, query: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
    sliding_window: int | None,
) -> AttentionPlan:  # fmt: skip
    """A ``paged_attention`` call's plan must describe the call: same batch, page size, window."""
    if not isinstance(plan, AttentionPlan):
        raise OpInputError("plan", f"expected an AttentionPlan, got {type(plan).__name__}")
    mismatch = [
        (name, mine, call)
        for name, mine, call in (
            ("num_seqs", plan.num_seqs, block_tables.shape[0]),
            ("num_tokens", plan.num_tokens, query.shape[0]),
            ("block_size", plan.block_size, k_cache.shape[1]),
            ("sliding_window", plan.sliding_window, sliding_window),
        )
        if mine != call
    ]
    if mismatch:
        name, mine, call = mismatch[0]
        raise OpInputError("plan", f"was made for {name}={mine}, but the call has {call}")
    if plan.null_block is not None and plan.null_block >= k_cache.shape[0]:
        raise OpInputError(
            "plan", f"null_block {plan.null_block} is outside the cache's {k_cache.shape[0]} blocks"
        )
    return plan
