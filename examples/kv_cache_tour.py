"""A short tour of servekit's paged KV cache: allocation, prefix hits, eviction, events.

Run: ``python examples/kv_cache_tour.py`` (or ``bash scripts/quickstart.sh``).
"""

from __future__ import annotations

import math

import torch

from servekit.engine.kv_cache import KVCache, build_block_tables, build_slot_mapping
from servekit.kv import KVCacheManager, KVEvent, KVSequence
from servekit.ops.reference import paged_attention, store_kv

BLOCK = 4


def show(event: KVEvent) -> None:
    print(f"    event: {event}")


def main() -> None:
    mgr = KVCacheManager(num_blocks=6, block_size=BLOCK, on_event=show)
    cache = KVCache(
        num_layers=1,
        num_blocks=6,
        block_size=BLOCK,
        num_kv_heads=1,
        head_dim=4,
        dtype=torch.float32,
    )
    k_cache, v_cache = cache[0]
    gen = torch.Generator().manual_seed(0)
    print(f"pool: {mgr.num_blocks} blocks of {BLOCK} tokens, {mgr.num_free_blocks} free")

    def run(seq: KVSequence) -> None:
        """Admit a sequence: prefix lookup, allocate, compute the missing KV, commit."""
        hit = mgr.get_num_cached_tokens(seq)
        n = len(seq.token_ids)
        ok = mgr.allocate(seq, n, hit)
        print(
            f"  {seq.seq_id}: {n} tokens, prefix hit {hit}, allocate -> {ok}, "
            f"blocks {seq.block_ids}, {mgr.num_free_blocks} free, usage {mgr.usage:.0%}"
        )
        if not ok:
            return
        slots = build_slot_mapping([seq.block_ids], [hit], [n], BLOCK)
        k = torch.randn(n - hit, 1, 4, generator=gen)
        store_kv(k, k, k_cache, v_cache, slots)  # the model would write real K/V here
        mgr.commit(seq, n)

    print("\n1. allocate a 10-token prompt: 3 blocks; commit makes its 2 full blocks hittable")
    system = [101, 7, 42, 9, 13, 5, 77, 8]
    a = KVSequence("a", [*system, 1, 2])
    run(a)

    print("\n2. a second request with the same 8-token prefix reuses 2 blocks (ref-counted)")
    b = KVSequence("b", [*system, 3, 4, 5])
    run(b)

    print("\n3. paged attention for both (one decode row each) through their block tables")
    q = torch.randn(2, 2, 4, generator=gen)
    out = paged_attention(
        q,
        k_cache,
        v_cache,
        build_block_tables([a.block_ids, b.block_ids]),
        torch.tensor([10, 11], dtype=torch.int32),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        scale=1 / math.sqrt(4),
    )
    print(f"  output {tuple(out.shape)}, finite: {bool(out.isfinite().all())}")

    print("\n4. free both: cached blocks stay hittable, tail first in the eviction order")
    mgr.free(a)
    mgr.free(b)
    print(f"  free list (next to reuse first): {mgr.pool.free_block_ids()}")

    print("\n5. a different tenant (cache salt) does not see those blocks")
    c = KVSequence("c", [*system, 6], cache_salt="tenant-2")
    run(c)
    mgr.free(c)

    print("\n6. a big request evicts the least recently freed cached blocks (BlockRemoved)")
    d = KVSequence("d", list(range(500, 520)))
    run(d)
    mgr.free(d)

    print("\n7. reset the prefix cache (nothing is held)")
    print(f"  reset_prefix_cache() -> {mgr.reset_prefix_cache()}")
    print(f"\nprefix cache: {mgr.prefix_hits} of {mgr.prefix_queries} queried tokens hit")


if __name__ == "__main__":
    main()
