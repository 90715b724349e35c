"""servekit.ops dispatch: backend choice, decode/prefill routing, and host-side validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import servekit.ops.triton as kernels
from servekit import ops
from servekit.ops import reference

from .paged_case import (
    DEVICE,
    PagedBatch,
    attend,
    check_close,
    make_batch,
    oracle_attention,
    poisoned_like,
)


def mixed_batch(
    dtype: torch.dtype = torch.float32,
    q_lens: list[int] | None = None,
    device: torch.device = DEVICE,
) -> PagedBatch:
    q_lens = q_lens or [1, 5, 1]
    return make_batch(11, q_lens=q_lens, seq_lens=[40, 21, 3], num_kv_heads=2, group=2,
                      head_dim=64, block_size=16, dtype=dtype, device=device)  # fmt: skip


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[str]:
    calls: list[str] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_cpu_tensors_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    ref_calls = spy(monkeypatch, reference, "paged_attention")
    kernel_calls = spy(monkeypatch, kernels, "paged_attention")
    attend(mixed_batch(device=torch.device("cpu")))
    assert ref_calls == ["paged_attention"] and kernel_calls == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_triton_can_be_forced_on_cpu(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    calls = spy(monkeypatch, kernels, "paged_attention")
    batch = mixed_batch(torch.bfloat16)
    if how == "environment":
        monkeypatch.setenv(ops.BACKEND_ENV, "triton")
        out = attend(batch)
    else:
        out = attend(batch, backend="triton")
    assert calls == ["paged_attention"]
    check_close(out, oracle_attention(batch), torch.bfloat16)


@pytest.mark.parametrize(("q_lens", "kernel"), [([1, 1, 1], "decode"), ([1, 5, 1], "prefill")])
def test_decode_kernel_only_when_every_sequence_has_one_row(
    monkeypatch: pytest.MonkeyPatch, q_lens: list[int], kernel: str
) -> None:
    decode = spy(monkeypatch, kernels, "paged_decode_attention")
    prefill = spy(monkeypatch, kernels, "paged_prefill_attention")
    batch = mixed_batch(q_lens=q_lens)
    out = poisoned_like(batch.query)
    assert attend(batch, backend="triton", out=out) is out
    assert len(decode) == (kernel == "decode") and len(prefill) == (kernel == "prefill")
    check_close(out, oracle_attention(batch), torch.float32)


def test_store_kv_dispatch_writes_fp8_through_triton_only() -> None:
    key = torch.randn(3, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
    slots = torch.tensor([0, -1, 17], device=DEVICE)
    with pytest.raises(ops.OpDtypeError) as err:
        ops.store_kv(key, key, cache, cache.clone(), slots, k_scale=0.5, v_scale=0.5,
                     backend="reference")  # fmt: skip
    assert err.value.field == "k_cache"
    ops.store_kv(key, key, cache, cache, slots, k_scale=0.5, v_scale=0.5, backend="triton")
    expected = (key[2] / 0.5).to(cache.dtype).float()
    assert torch.equal(cache.view(-1, 2, 64)[17].float(), expected)


def test_unknown_backend_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ops.OpInputError) as err:
        attend(mixed_batch())
    assert err.value.field == "backend"


def _bad_attention_inputs() -> list[tuple[str, dict[str, Any], type[Exception]]]:
    b = mixed_batch()
    return [
        ("query", {"query": b.query[..., :32]}, ops.OpInputError),
        ("query", {"query": b.query.double()}, ops.OpDtypeError),
        ("query", {"query": b.query[:, :3]}, ops.OpInputError),  # 3 heads over 2 KV heads
        ("k_cache", {"k_cache": b.k_cache[0]}, ops.OpInputError),
        ("v_cache", {"v_cache": b.v_cache.half()}, ops.OpDtypeError),
        ("k_cache", {"k_cache": b.k_cache.half(), "v_cache": b.v_cache.half()}, ops.OpDtypeError),
        ("block_tables", {"block_tables": b.block_tables.float()}, ops.OpDtypeError),
        ("seq_lens", {"seq_lens": b.seq_lens[:2]}, ops.OpInputError),
        ("query_start_loc", {"query_start_loc": b.query_start_loc[:-1]}, ops.OpInputError),
        ("sliding_window", {"sliding_window": 0}, ops.OpInputError),
        ("scale", {"scale": float("nan")}, ops.OpInputError),
        ("out", {"out": torch.empty(3, 4, 64)}, ops.OpInputError),
        ("out", {"out": torch.empty_like(b.query, dtype=torch.float16)}, ops.OpDtypeError),
        ("k_scale", {"k_scale": 2.0}, ops.OpInputError),  # scales apply to fp8 caches only
    ]


@pytest.mark.parametrize(("field", "change", "error"), _bad_attention_inputs())
def test_paged_attention_names_the_bad_field(
    field: str, change: dict[str, Any], error: type[Exception]
) -> None:
    b = mixed_batch()
    args: dict[str, Any] = {
        "query": b.query, "k_cache": b.k_cache, "v_cache": b.v_cache,
        "block_tables": b.block_tables, "seq_lens": b.seq_lens,
        "query_start_loc": b.query_start_loc, "scale": b.scale,
    }  # fmt: skip
    args.update(change)
    with pytest.raises(error) as err:
        ops.paged_attention(**args)
    assert isinstance(err.value, ops.AttentionInputError)
    assert err.value.field == field  # type: ignore[attr-defined]
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("key", {"key": torch.randn(3, 2, 32)}),
        ("value", {"value": torch.randn(4, 2, 64)}),
        ("key", {"key": torch.randn(3, 2, 64, dtype=torch.float64)}),
        ("slot_mapping", {"slot_mapping": torch.tensor([0, 1])}),
        ("slot_mapping", {"slot_mapping": torch.tensor([0.0, 1.0, 2.0])}),
        ("k_cache", {"k_cache": torch.zeros(2, 16, 2, 64, dtype=torch.float16)}),
    ],
)
def test_store_kv_names_the_bad_field(field: str, change: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "key": torch.randn(3, 2, 64), "value": torch.randn(3, 2, 64),
        "k_cache": torch.zeros(2, 16, 2, 64), "v_cache": torch.zeros(2, 16, 2, 64),
        "slot_mapping": torch.tensor([0, 1, 2]),
    }  # fmt: skip
    if "k_cache" in change:
        args["v_cache"] = change["k_cache"].clone()
    args.update(change)
    with pytest.raises(ops.OpInputError) as err:
        ops.store_kv(**args)
    assert err.value.field == field


@pytest.mark.parametrize("q_lens", [[1, 1], [3, 9]])
@pytest.mark.slow
def test_group_and_head_dim_need_not_be_powers_of_two(q_lens: list[int]) -> None:
    # 12 query heads over 4 KV heads (group 3), head_dim 80: padded tiles, masked lanes
    batch = make_batch(13, q_lens=q_lens, seq_lens=[45, 19], num_kv_heads=4, group=3,
                       head_dim=80, block_size=16, dtype=torch.float16)  # fmt: skip
    out = poisoned_like(batch.query)
    attend(batch, backend="triton", out=out, sliding_window=30)
    check_close(out, oracle_attention(batch, 30), torch.float16)


def test_a_plan_routes_the_triton_launch_and_sizes_its_splits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 rows for 3 sequences, but one owns 2 and one none: without a plan this reads as decode
    batch = make_batch(17, q_lens=[2, 0, 1], seq_lens=[70, 9, 33], num_kv_heads=2, group=2,
                       head_dim=64, block_size=16, dtype=torch.float32, spare_columns=4)  # fmt: skip
    tables, lens = batch.block_tables.cpu().numpy(), batch.seq_lens.cpu().numpy()
    plan = ops.plan_attention(tables, lens, batch.query_start_loc.cpu().numpy(), block_size=16,
                              device=DEVICE)  # fmt: skip
    prefill = spy(monkeypatch, kernels, "paged_prefill_attention")
    out = poisoned_like(batch.query)
    attend(batch, backend="triton", out=out, plan=plan)
    assert prefill == ["paged_prefill_attention"]
    check_close(out, oracle_attention(batch), torch.float32)
    # decode: the split count comes from the longest context, not the (wider) block table
    decode = make_batch(18, q_lens=[1, 1], seq_lens=[70, 9], num_kv_heads=2, group=2,
                        head_dim=64, block_size=16, dtype=torch.float32, spare_columns=8)  # fmt: skip
    seen: list[int] = []
    real = kernels.decode.choose_num_splits

    def choose(num_seqs: int, kv_heads: int, max_context: int, **kw: Any) -> int:
        seen.append(max_context)
        return real(num_seqs, kv_heads, max_context, **kw)

    monkeypatch.setattr(kernels.decode, "choose_num_splits", choose)
    plan = ops.plan_attention(decode.block_tables.cpu().numpy(), decode.seq_lens.cpu().numpy(),
                              decode.query_start_loc.cpu().numpy(), block_size=16,
                              device=DEVICE)  # fmt: skip
    out = poisoned_like(decode.query)
    attend(decode, backend="triton", out=out, plan=plan)
    attend(decode, backend="triton", out=poisoned_like(decode.query))
    assert seen == [70, decode.block_tables.shape[1] * 16]
    check_close(out, oracle_attention(decode), torch.float32)
