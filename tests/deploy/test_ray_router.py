"""The Ray request router's routing state (no cluster, but for one slow test): the cache-aware
policy reads the held blocks and loads replicas report, bounded loads win over a cache hit,
membership follows Ray, and a request's in-flight count is released once whatever the order of
Ray's hooks and the call's end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest, ReplicaID  # noqa: E402

from servekit.deploy.ray.router import ReplicaRouting, ServekitRequestRouter  # noqa: E402
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
    routing.completed("req-2")  # a second time: nothing more
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


# Ray's side of a call, for the hooks of ServekitRequestRouter (the slow test below checks that
# Ray's own ReplicaResult keeps the contract Call stands for).
DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="servekit-test")


class Call:
    """A call's result as Ray's ``ReplicaResult`` behaves: ``add_done_callback`` runs the
    callback when the call ends (success, error, cancel), or at once if it has ended."""

    def __init__(self) -> None:
        self.done = False
        self._callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self.done:
            callback(None)
        else:
            self._callbacks.append(callback)

    def finish(self) -> None:
        self.done = True
        for callback in self._callbacks:
            callback(None)
        self._callbacks.clear()


def ray_router() -> ServekitRequestRouter:
    """A router over replicas r1 and r2, as Ray builds it (call inside an event loop)."""
    router = ServekitRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy="cache_aware", reported_load=False)
    router.routing.sync({"r1": stats(), "r2": stats()})
    return router


def replica(name: str) -> ReplicaID:
    return ReplicaID(name, DEPLOYMENT)


def pending(request_id: str) -> PendingRequest:
    return PendingRequest(args=[PROMPT_A], kwargs={}, metadata=RequestMetadata(
        request_id=request_id, internal_request_id=request_id, call_method="generate",
        is_streaming=True))


async def drained() -> None:
    """Run what Ray's threads handed to this loop (call_soon_threadsafe)."""
    for _ in range(2):
        await asyncio.sleep(0)


def test_a_call_that_ends_before_ray_reports_it_routed_is_not_left_in_flight() -> None:
    # Ray registers its done callback (on_request_completed) when it sends the call, then
    # awaits the replica's acceptance; a call that ends before this loop resumes reaches
    # on_request_completed first, then on_request_routed
    async def main() -> int:
        router = ray_router()
        call = Call()
        call.finish()
        router.on_request_completed(replica("r1"), "req-1")
        router.on_request_routed(pending("req-1"), replica("r1"), call)
        await drained()
        return router.routing.in_flight("r1")

    assert asyncio.run(main()) == 0


def test_a_rejected_attempt_ending_does_not_release_its_retry() -> None:
    # r1 rejected the first attempt (full) and took the retry, under the same request id; Ray
    # reports the rejected attempt's end after the retry was routed
    async def main() -> list[int]:
        router = ray_router()
        rejected, retry = Call(), Call()
        router.on_request_routed(pending("req-1"), replica("r1"), retry)
        rejected.finish()
        router.on_request_completed(replica("r1"), "req-1")
        await drained()
        live = router.routing.in_flight("r1")
        retry.finish()
        router.on_request_completed(replica("r1"), "req-1")
        await drained()
        return [live, router.routing.in_flight("r1")]

    assert asyncio.run(main()) == [1, 0]


@pytest.mark.slow
def test_rays_own_results_release_a_call_that_finished_or_was_cancelled_before_routed(
        ray_serve: Any) -> None:
    """:class:`Call`'s contract, on the session's Ray: a streaming call's ``ReplicaResult`` runs
    a done callback registered after the call finished, or after it was cancelled."""
    import ray
    from ray.serve._private.replica_result import ActorReplicaResult

    @ray.remote
    def stream(n: int, pause: float) -> Any:
        for i in range(n):
            yield i
            time.sleep(pause)

    async def main() -> dict[str, int]:
        router = ray_router()
        finished = stream.options(num_returns="streaming").remote(2, 0.0)
        async for ref in finished:  # to its end: the task has returned
            await ref
        cancelled = stream.options(num_returns="streaming").remote(10**6, 1.0)
        await (await cancelled.__anext__())  # running
        to_cancel = ActorReplicaResult(cancelled, pending("cancelled").metadata)
        to_cancel.cancel()
        with pytest.raises(ray.exceptions.TaskCancelledError):
            await cancelled.completed()
        router.on_request_routed(pending("finished"), replica("r1"),
                                 ActorReplicaResult(finished, pending("finished").metadata))
        router.on_request_routed(pending("cancelled"), replica("r2"), to_cancel)
        deadline = time.monotonic() + 30
        while (any(router.routing.in_flight(n) for n in ("r1", "r2"))
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        return {n: router.routing.in_flight(n) for n in ("r1", "r2")}

    assert asyncio.run(main()) == {"r1": 0, "r2": 0}


class InFlightMachine(RuleBasedStateMachine):
    """Ray's hooks and the calls' ends in any order: each replica's in-flight count is the
    accepted calls routed to it that have not ended (rejected attempts never count; a retry
    reuses its request id)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.router = self.loop.run_until_complete(self._make())
        # per attempt: [request id, replica, accepted, Call, routed, Ray's hook ran]
        self.attempts: list[list[Any]] = []
        self.ids = 0

    @staticmethod
    async def _make() -> ServekitRequestRouter:
        return ray_router()

    @rule(name=st.sampled_from(["r1", "r2"]), accepted=st.booleans(), retry=st.booleans())
    def send(self, name: str, accepted: bool, retry: bool) -> None:
        # a retry follows a rejected attempt of a request not yet accepted anywhere
        rejected = {a[0] for a in self.attempts if not a[2]}
        taken = {a[0] for a in self.attempts if a[2]}
        open_ids = sorted(rejected - taken)
        if retry and open_ids:
            request_id = open_ids[0]
        else:
            self.ids += 1
            request_id = f"req-{self.ids}"
        self.attempts.append([request_id, name, accepted, Call(), False, False])

    @precondition(lambda self: any(a[2] and not a[4] for a in self.attempts))
    @rule(data=st.data())
    def accepted(self, data: st.DataObject) -> None:
        attempt = data.draw(st.sampled_from([a for a in self.attempts if a[2] and not a[4]]))
        attempt[4] = True

        async def hook() -> None:
            self.router.on_request_routed(pending(attempt[0]), replica(attempt[1]), attempt[3])

        self.loop.run_until_complete(hook())

    @precondition(lambda self: any(not a[3].done for a in self.attempts))
    @rule(data=st.data())
    def ends(self, data: st.DataObject) -> None:
        # success, error, cancel or a lost replica: the call is done (a rejected one at once)
        data.draw(st.sampled_from([a for a in self.attempts if not a[3].done]))[3].finish()

    @precondition(lambda self: any(a[3].done and not a[5] for a in self.attempts))
    @rule(data=st.data())
    def ray_reports_completed(self, data: st.DataObject) -> None:
        attempt = data.draw(st.sampled_from([a for a in self.attempts
                                             if a[3].done and not a[5]]))
        attempt[5] = True
        self.router.on_request_completed(replica(attempt[1]), attempt[0])

    @rule()
    def loop_runs(self) -> None:
        self.loop.run_until_complete(drained())
        for name in ("r1", "r2"):
            live = sum(1 for a in self.attempts if a[1] == name and a[4] and not a[3].done)
            assert self.router.routing.in_flight(name) == live, (name, self.attempts)

    def teardown(self) -> None:
        for attempt in self.attempts:
            attempt[3].finish()
        self.loop.run_until_complete(drained())
        try:
            assert [self.router.routing.in_flight(n) for n in ("r1", "r2")] == [0, 0]
        finally:
            self.loop.close()


TestInFlightMachine = InFlightMachine.TestCase
