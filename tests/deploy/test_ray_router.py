"""The Ray request router's routing state (no cluster): the cache-aware policy reads the held
blocks and loads replicas report, bounded loads win over a cache hit, membership follows Ray."""

from __future__ import annotations

import pytest

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from servekit.deploy.ray.router import ReplicaRouting  # noqa: E402
from servekit.route import PrefixKey  # noqa: E402

PROMPT_A = list(range(1, 129))  # 8 blocks of 16
PROMPT_B = list(range(200, 328))


def stats(blocks: tuple[int, ...] = (), running: int = 0, version: int = 1) -> dict[str, object]:
    return {"running": running, "waiting": 0, "kv_usage": 0.1, "blocks": list(blocks),
            "blocks_version": version}


def hashes(prompt: list[int]) -> tuple[int, ...]:
    return PrefixKey(16).block_hashes(prompt)


def test_cache_aware_picks_the_replica_holding_the_prefix() -> None:
    routing = ReplicaRouting("cache_aware")
    routing.sync({"r1": stats(hashes(PROMPT_A)), "r2": stats(hashes(PROMPT_B))})
    assert routing.choose(["r1", "r2"], ([*PROMPT_A, 7, 7], None, None))[0] == ["r1"]
    assert routing.choose(["r1", "r2"], ([*PROMPT_B, 9], None, None))[0] == ["r2"]


def test_the_cache_salt_is_part_of_the_hashes() -> None:
    routing = ReplicaRouting("cache_aware")
    salted = PrefixKey(16).block_hashes(PROMPT_A, "tenant-1")
    routing.sync({"r1": stats(salted), "r2": stats(hashes(PROMPT_A))})
    assert routing.choose(["r1", "r2"], (PROMPT_A, "t1", "tenant-1"))[0] == ["r1"]
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0] == ["r2"]


def test_a_new_snapshot_replaces_the_old_one() -> None:
    routing = ReplicaRouting("cache_aware")
    routing.sync({"r1": stats(hashes(PROMPT_A), version=1), "r2": stats()})
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0] == ["r1"]
    routing.sync({"r1": stats(version=2), "r2": stats(hashes(PROMPT_A), version=5)})
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0] == ["r2"]


def test_bounded_load_beats_a_cache_hit() -> None:
    routing = ReplicaRouting("cache_aware")
    routing.sync({"r1": stats(hashes(PROMPT_A), running=40), "r2": stats(running=0)})
    ranks = routing.choose(["r1", "r2"], (PROMPT_A, None, None))
    assert ranks == [["r2"], ["r1"]]  # the loaded holder is only the fallback


def test_in_flight_counts_follow_ray_callbacks() -> None:
    routing = ReplicaRouting("least_loaded")
    routing.sync({"r1": stats(), "r2": stats()})
    routing.routed("req-1", "r1")
    routing.routed("req-2", "r1")
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0] == ["r2"]
    assert routing.router.load("r1") == 2
    routing.completed("req-1")
    routing.completed("req-2")
    routing.completed("unknown")  # a call routed before this router knew it: ignored
    assert routing.router.load("r1") == 0
    # calls other than generate: every candidate, least loaded first
    routing.routed("req-3", "r2")
    assert routing.choose(["r1", "r2"], None) == [["r1", "r2"]]


def test_membership_follows_the_replica_set() -> None:
    routing = ReplicaRouting("cache_aware")
    routing.sync({"r1": stats(hashes(PROMPT_A)), "r2": stats()})
    routing.sync({"r2": stats(), "r3": stats()})
    assert set(routing.router.replicas) == {"r2", "r3"}
    assert routing.index.cached_blocks(hashes(PROMPT_A)) == {}
    assert routing.choose(["r2", "r3"], (PROMPT_A, None, None))[0][0] in {"r2", "r3"}


@pytest.mark.parametrize("policy", ["consistent_hash", "cache_aware", "power_of_two"])
def test_a_prompt_shorter_than_a_block_still_routes(policy: str) -> None:
    routing = ReplicaRouting(policy)
    routing.sync({"r1": stats(), "r2": stats()})
    ranks = routing.choose(["r1", "r2"], ([1, 2, 3], None, None))
    assert sorted(n for rank in ranks for n in rank) == ["r1", "r2"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_sent_prompt_counts_as_held_by_its_replica_until_reports_must_show_it() -> None:
    clock = Clock()
    routing = ReplicaRouting("cache_aware", sent_ttl=2.0, clock=clock)
    routing.sync({"r1": stats(version=1), "r2": stats(version=1)})
    first = routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0][0]
    other = "r2" if first == "r1" else "r1"
    routing.routed("a", first, (PROMPT_A, None, None))
    routing.completed("a")
    # no report has its blocks yet: the next turn (the prompt and more) still follows it
    assert routing.index.cached_blocks(hashes(PROMPT_A)) == {first: 8}
    assert routing.choose(["r1", "r2"], ([*PROMPT_A, *range(500, 540)], None, None))[0] \
        == [first]
    # a report taken before the prefill (without the blocks) does not drop them...
    clock.now = 1.0
    routing.sync({first: stats(version=2), other: stats(version=2)})
    assert routing.index.cached_blocks(hashes(PROMPT_A)) == {first: 8}
    # ...until sent_ttl has passed: then only what the replicas report counts
    clock.now = 2.5
    routing.sync({first: stats(version=3), other: stats(hashes(PROMPT_A), version=3)})
    assert routing.index.cached_blocks(hashes(PROMPT_A)) == {other: 8}


def test_a_request_whose_completion_never_comes_is_dropped_once_its_replica_reports_idle(
        ) -> None:
    clock = Clock()
    routing = ReplicaRouting("cache_aware", sent_ttl=2.0, reported_load=False, clock=clock)
    routing.sync({"r1": stats(), "r2": stats()})
    routing.routed("lost", "r1")  # Ray never calls completed for it
    clock.now = 1.0
    routing.routed("live", "r1")
    routing.sync({"r1": stats(), "r2": stats()})  # idle, but the report may predate both
    assert routing.in_flight("r1") == 2
    clock.now = 2.5
    routing.sync({"r1": stats(running=1), "r2": stats()})  # busy: nothing is dropped
    assert routing.in_flight("r1") == 2
    routing.sync({"r1": stats(), "r2": stats()})  # idle, sent_ttl after "lost" was sent
    assert routing.in_flight("r1") == 1  # "live" was sent 1.5 s ago: kept
    routing.completed("live")
    routing.completed("lost")  # a late callback changes nothing
    assert routing.in_flight("r1") == 0


def test_only_generate_calls_hold_blocks() -> None:
    routing = ReplicaRouting("cache_aware")
    routing.sync({"r1": stats(), "r2": stats()})
    routing.routed("info", "r1")  # not a generate call: no prompt
    routing.routed("short", "r1", ([1, 2, 3], None, None))  # no full block
    assert routing.index.cached_blocks(hashes(PROMPT_A)) == {}
    assert routing.router.load("r1") == 2


def test_without_reported_load_only_the_routers_own_in_flight_counts() -> None:
    routing = ReplicaRouting("cache_aware", reported_load=False)
    routing.sync({"r1": stats(hashes(PROMPT_A), running=40), "r2": stats(running=0)})
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None))[0] == ["r1"]  # a stale report
    for i in range(3):
        routing.routed(f"r{i}", "r1")
    assert routing.choose(["r1", "r2"], (PROMPT_A, None, None)) == [["r2"], ["r1"]]
