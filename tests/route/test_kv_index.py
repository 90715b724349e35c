"""The KV-event index: replay of stored/removed/cleared events, resets on gaps and restarts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.route import CacheIndex
from servekit.route.errors import InvalidRouteParameterError
from servekit.route.kv_index import KVEventIndex


def test_is_a_cache_index() -> None:
    assert isinstance(KVEventIndex(), CacheIndex)


def test_counts_leading_blocks_per_replica() -> None:
    index = KVEventIndex()
    index.stored("a", 0, [1, 2, 3])
    index.stored("b", 0, [1, 2])
    index.stored("c", 0, [2, 3])  # holds later blocks but not the first: no prefix hit
    assert index.cached_blocks([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.cached_blocks([9, 1]) == {}
    assert index.cached_blocks([]) == {}


def test_removed_and_cleared() -> None:
    index = KVEventIndex()
    index.stored("a", 0, [1, 2, 3])
    index.removed("a", 1, [2])
    assert index.cached_blocks([1, 2, 3]) == {"a": 1}
    index.cleared("a", 2)
    assert index.cached_blocks([1]) == {}
    assert index.last_seq("a") == 2


def test_a_gap_resets_the_replica() -> None:
    index = KVEventIndex()
    index.stored("a", 0, [1, 2])
    index.stored("b", 0, [1, 2])
    index.stored("a", 5, [7])  # events 1..4 were missed: what "a" held is no longer trusted
    assert index.blocks("a") == frozenset({7})
    assert index.cached_blocks([1, 2]) == {"b": 2}
    assert index.resets == {"a": 1}


def test_a_regression_resets_the_replica() -> None:
    index = KVEventIndex()
    index.stored("a", 0, [1])
    index.stored("a", 1, [2])
    index.stored("a", 0, [3])  # the replica restarted and numbers from 0 again
    assert index.blocks("a") == frozenset({3})
    assert index.last_seq("a") == 0


def test_remove_replica_forgets_it() -> None:
    index = KVEventIndex()
    index.stored("a", 0, [1])
    index.remove_replica("a")
    assert index.cached_blocks([1]) == {}
    assert index.replicas == ()


@pytest.mark.parametrize("seq", [-1, 1.5, True, "3"])
def test_bad_sequence_numbers_name_the_field(seq: object) -> None:
    with pytest.raises(InvalidRouteParameterError, match="seq"):
        KVEventIndex().stored("a", seq, [1])  # type: ignore[arg-type]


_event = st.tuples(
    st.sampled_from(["stored", "removed", "cleared"]),
    st.sampled_from(["a", "b", "c"]),
    st.lists(st.integers(0, 7), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event, max_size=40), query=st.lists(st.integers(0, 7), max_size=6))
def test_matches_a_model_of_per_replica_sets(
    events: list[tuple[str, str, list[int]]], query: list[int]
) -> None:
    """In-order events: the index equals per-replica sets, and prefix counts follow from them."""
    index = KVEventIndex()
    model: dict[str, set[int]] = {}
    seqs: dict[str, int] = {}
    for kind, replica, hashes in events:
        seq = seqs.get(replica, -1) + 1
        seqs[replica] = seq
        held = model.setdefault(replica, set())
        if kind == "stored":
            index.stored(replica, seq, hashes)
            held.update(hashes)
        elif kind == "removed":
            index.removed(replica, seq, hashes)
            held.difference_update(hashes)
        else:
            index.cleared(replica, seq)
            held.clear()
    for replica, held in model.items():
        assert index.blocks(replica) == held
    expected = {}
    for replica, held in model.items():
        depth = 0
        while depth < len(query) and query[depth] in held:
            depth += 1
        if depth:
            expected[replica] = depth
    assert dict(index.cached_blocks(query)) == expected
    assert index.resets == {}
