"""The planned CPU backend of servekit.ops.paged_attention equals the reference; the plan API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit import ops
from servekit.ops import cpu, reference

from .paged_case import PagedBatch, attend, check_close, make_batch, oracle_attention, poisoned_like

CPU = torch.device("cpu")
BS, HKV, D = 4, 2, 8


def plan_for(batch: PagedBatch, **kwargs: Any) -> ops.AttentionPlan:
    return ops.plan_attention(batch.block_tables.numpy(), batch.seq_lens.numpy(),
                              batch.query_start_loc.numpy(), block_size=batch.k_cache.shape[1],
                              **kwargs)  # fmt: skip


def poison_block_zero(batch: PagedBatch) -> None:
    """Move block 0's contents to a spare block, so the tables' padding (0) points at NaN."""
    bs = batch.k_cache.shape[1]
    lens = batch.seq_lens.tolist()
    used = [row[: -(-n // bs)] for row, n in zip(batch.block_tables, lens, strict=True)]
    if not any(bool((ids == 0).any()) for ids in used):
        return
    spare = min(set(range(batch.k_cache.shape[0])) - {int(i) for ids in used for i in ids})
    for ids in used:
        ids[ids == 0] = spare  # a view into block_tables
    for cache in (batch.k_cache, batch.v_cache):
        cache[spare] = cache[0]
        cache[0] = float("nan")


def zero_spare_block(batch: PagedBatch) -> int:
    """Zero a block no table uses (the engine's null block) and return its id."""
    used = set(batch.block_tables.flatten().tolist())
    spare = max(set(range(batch.k_cache.shape[0])) - used)
    batch.k_cache[spare] = 0.0
    batch.v_cache[spare] = 0.0
    return spare


# (new tokens, cached tokens) per sequence: 1 new = a decode, 0 new = a sequence with no rows
sequences = st.lists(
    st.tuples(st.just(1) | st.integers(0, 20), st.integers(0, 20)).filter(lambda s: sum(s) > 0),
    min_size=1,
    max_size=6,
).filter(lambda seqs: any(new for new, _ in seqs))  # at least one query row


@settings(max_examples=40, deadline=None)
@given(
    seqs=sequences,
    group=st.sampled_from([1, 2, 4]),
    window=st.sampled_from([None, 1, 3, 7]),
    null_block=st.booleans(),
    group_size=st.sampled_from([1, 2, 16]),
    seed=st.integers(0, 2**16),
)
def test_planned_cpu_backend_matches_the_reference(
    seqs: list[tuple[int, int]], group: int, window: int | None, null_block: bool,
    group_size: int, seed: int,
) -> None:  # fmt: skip
    """Mixed decodes, fresh prefills and chunks over cached prefixes, GQA, sliding windows;
    every unused cache slot holds NaN (but the zero null block) and the output starts as NaN."""
    batch = make_batch(seed, q_lens=[n for n, _ in seqs], seq_lens=[n + c for n, c in seqs],
                       num_kv_heads=HKV, group=group, head_dim=D, block_size=BS,
                       dtype=torch.float32, spare_blocks=3, device=CPU)  # fmt: skip
    poison_block_zero(batch)
    null = zero_spare_block(batch) if null_block else None
    plan = plan_for(batch, sliding_window=window, null_block=null, decode_group_size=group_size)
    out = poisoned_like(batch.query)
    assert attend(batch, sliding_window=window, plan=plan, out=out) is out
    check_close(out, oracle_attention(batch, window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches(dtype: torch.dtype) -> None:
    batch = make_batch(3, q_lens=[1, 9, 1, 4], seq_lens=[30, 9, 5, 17], num_kv_heads=HKV,
                       group=2, head_dim=32, block_size=BS, dtype=dtype, device=CPU)  # fmt: skip
    out = attend(batch, sliding_window=6, plan=plan_for(batch, sliding_window=6))
    assert out.dtype == dtype
    check_close(out, oracle_attention(batch, 6), dtype)


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[str]:
    calls: list[str] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(f"{getattr(module, '__name__', '?')}.{name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def small_batch(**kwargs: Any) -> PagedBatch:
    args: dict[str, Any] = dict(q_lens=[1, 5, 1], seq_lens=[11, 7, 3], num_kv_heads=HKV,
                                group=2, head_dim=D, block_size=BS, dtype=torch.float32,
                                device=CPU)  # fmt: skip
    args.update(kwargs)
    return make_batch(5, **args)


@pytest.mark.parametrize(("backend", "planned", "runs"), [
    (None, True, "servekit.ops.cpu"), (None, False, "servekit.ops.reference"),
    ("reference", True, "servekit.ops.reference"), ("cpu", True, "servekit.ops.cpu"),
])  # fmt: skip
def test_cpu_tensors_run_the_plan_or_the_reference(
    monkeypatch: pytest.MonkeyPatch, backend: str | None, planned: bool, runs: str
) -> None:
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    calls = spy(monkeypatch, cpu, "paged_attention")
    ref_calls = spy(monkeypatch, reference, "paged_attention")
    batch = small_batch()
    out = attend(batch, plan=plan_for(batch) if planned else None, backend=backend)
    assert calls + ref_calls == [f"{runs}.paged_attention"]
    check_close(out, oracle_attention(batch), torch.float32)


def _plan_errors() -> list[tuple[str, dict[str, Any], str]]:
    b = small_batch()
    other = small_batch(q_lens=[1, 4, 1])
    eight = ops.plan_attention(
        b.block_tables.numpy(), b.seq_lens.numpy(), b.query_start_loc.numpy(), block_size=8
    )
    return [
        ("no plan", {"backend": "cpu"}, "runs a plan"),
        ("other batch", {"plan": plan_for(other)}, "num_tokens=6"),
        ("other window", {"plan": plan_for(b, sliding_window=4)}, "sliding_window=4"),
        ("other pages", {"plan": eight}, "block_size=8"),
        ("null block", {"plan": plan_for(b, null_block=99)}, "null_block 99"),
        ("made for cuda", {"plan": plan_for(b, device="cuda")}, "not for CPU tensors"),
        ("not a plan", {"plan": "plan"}, "AttentionPlan"),
    ]


PLAN_ERRORS = _plan_errors()


@pytest.mark.parametrize(
    ("case", "change", "message"), PLAN_ERRORS, ids=[c[0] for c in PLAN_ERRORS]
)
def test_a_plan_that_does_not_fit_the_call_is_rejected(
    case: str, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ops.OpInputError, match=message) as err:
        attend(small_batch(), **change)
    assert err.value.field == "plan"


def test_fp8_caches_need_triton_on_the_cpu_backend_too() -> None:
    batch = small_batch()
    with pytest.raises(ops.OpDtypeError) as err:
        ops.paged_attention(
            batch.query, batch.k_cache.to(torch.float8_e4m3fn),
            batch.v_cache.to(torch.float8_e4m3fn), batch.block_tables, batch.seq_lens,
            batch.query_start_loc, scale=batch.scale, k_scale=1.0, v_scale=1.0,
            plan=plan_for(batch),
        )  # fmt: skip
    assert err.value.field == "k_cache"


def _bad_metadata() -> list[tuple[str, dict[str, Any]]]:
    tables = np.array([[0, 1], [2, 0]], dtype=np.int32)
    lens = np.array([6, 3], dtype=np.int32)
    starts = np.array([0, 1, 4], dtype=np.int32)
    return [
        ("block_tables", {"block_tables": tables[:, :1]}),  # 6 tokens need 2 blocks of 4
        ("block_tables", {"block_tables": tables.astype(np.float32)}),
        ("block_tables", {"block_tables": tables[0]}),
        ("seq_lens", {"seq_lens": lens[:1]}),
        ("seq_lens", {"seq_lens": np.array([6, 2], dtype=np.int32)}),  # 3 rows, 2 tokens
        ("seq_lens", {"seq_lens": [6, 3]}),
        ("query_start_loc", {"query_start_loc": starts[:2]}),
        ("query_start_loc", {"query_start_loc": np.array([1, 1, 4], dtype=np.int32)}),
        ("query_start_loc", {"query_start_loc": np.array([0, 3, 2], dtype=np.int32)}),
        ("block_size", {"block_size": 0}),
        ("sliding_window", {"sliding_window": 0}),
        ("null_block", {"null_block": -1}),
        ("decode_group_size", {"decode_group_size": 0}),
    ]


@pytest.mark.parametrize(("field", "change"), _bad_metadata())
def test_plan_attention_names_the_bad_field(field: str, change: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "block_tables": np.array([[0, 1], [2, 0]], dtype=np.int32),
        "seq_lens": torch.tensor([6, 3], dtype=torch.int32),  # CPU tensors are host arrays too
        "query_start_loc": np.array([0, 1, 4], dtype=np.int64), "block_size": BS,
    }  # fmt: skip
    args.update(change)
    with pytest.raises(ops.OpInputError) as err:
        ops.plan_attention(**args)
    assert err.value.field == field and field in str(err.value)


def test_plan_summarises_the_step() -> None:
    tables = np.array([[0, 1, 0], [2, 0, 0], [3, 4, 5]], dtype=np.int32)
    plan = ops.plan_attention(tables, np.array([6, 3, 9]), np.array([0, 1, 1, 2]),
                              block_size=4, sliding_window=2)  # fmt: skip
    assert (plan.num_seqs, plan.num_tokens, plan.max_seq_len) == (3, 2, 9)
    assert plan.decode and plan.max_context == 6  # the window plus a block
    assert plan.cpu is not None and len(plan.cpu.groups) == 1 and not plan.cpu.chunks
    prefill = ops.plan_attention(tables, np.array([6, 3, 9]), np.array([0, 1, 1, 5]),
                                 block_size=4, device="cuda")  # fmt: skip
    assert not prefill.decode and prefill.max_context == 9 and prefill.cpu is None
