"""StreamTracker: however the upstream bytes are split, the client gets the events less the
token-id comments, and the tracker the ids of exactly the events it handed on."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from servekit.gateway.failover import StreamTracker, resumable, resume_body
from servekit.server.replica_api import token_ids_comment


def _event(i: int, text: str) -> bytes:
    body = {"id": "cmpl-1", "created": 7, "choices": [{"index": 0, "text": text}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[list[int], bytes]], list[int]]:
    """(token ids, event bytes or b"" for a held-back token) per delta, and cut points."""
    n = draw(st.integers(1, 12))
    deltas = []
    for i in range(n):
        ids = draw(st.lists(st.integers(0, 50_000), min_size=1, max_size=3))
        text = draw(st.sampled_from(["", "a", "é", "\n\n", "data: x", "日本"]))
        deltas.append((ids, _event(i, text) if text else b""))
    return deltas, draw(st.lists(st.integers(0, 10_000), max_size=8))


@given(streams(), st.booleans())
def test_any_split_relays_the_events_less_the_comments(
        case: tuple[list[tuple[list[int], bytes]], list[int]], finished: bool) -> None:
    deltas, cuts = case
    wire = b"".join(token_ids_comment(0, ids) + (ev or b"\n") for ids, ev in deltas)
    plain = b"".join(ev for _, ev in deltas)
    if finished:
        wire += b"data: [DONE]\n\n"
        plain += b"data: [DONE]\n\n"
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    tracker = StreamTracker()
    out = b"".join(tracker.feed(wire[a:b]) for a, b in itertools.pairwise(points))
    assert out == plain
    assert tracker.token_ids == [t for ids, _ in deltas for t in ids]
    assert tracker.num_tokens == len(tracker.token_ids)
    assert tracker.done is finished
    assert (tracker.request_id, tracker.created) == (
        ("cmpl-1", 7) if any(ev for _, ev in deltas) else (None, None))


@given(streams(), st.integers(1, 10_000))
def test_a_cut_keeps_the_ids_of_the_events_relayed_whole(
        case: tuple[list[tuple[list[int], bytes]], list[int]], at: int) -> None:
    deltas, _ = case
    pieces = [token_ids_comment(0, ids) + (ev or b"\n") for ids, ev in deltas]
    wire = b"".join(pieces)
    at %= len(wire)
    tracker = StreamTracker()
    out = tracker.feed(wire[:at])
    whole, size = 0, 0
    for piece in pieces:  # the events that arrived whole
        if size + len(piece) > at:
            break
        size += len(piece)
        whole += 1
    assert tracker.token_ids == [t for ids, _ in deltas[:whole] for t in ids]
    assert out == b"".join(ev for _, ev in deltas[:whole])
    tracker.cut()
    assert tracker.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and tracker.done


def test_a_draining_error_is_held_back_and_the_stream_is_not_done() -> None:
    tracker = StreamTracker()
    err = b'data: {"error": {"message": "bye", "type": "x", "code": "draining"}}\n\n'
    out = tracker.feed(token_ids_comment(0, [5]) + _event(0, "a") + err + b"data: [DONE]\n\n")
    assert out == _event(0, "a") and tracker.drained and not tracker.done
    other = StreamTracker()  # any other error event is the stream's own end: relayed
    boom = err.replace(b"draining", b"boom")
    assert other.feed(boom + b"data: [DONE]\n\n") == boom + b"data: [DONE]\n\n" and other.done


def test_resumable_requests_and_the_resume_body() -> None:
    assert resumable("/v1/completions", {"stream": True, "prompt": "x"})
    assert resumable("/v1/completions", {"stream": True, "prompt": [1, 2]})
    assert resumable("/v1/chat/completions", {"stream": True, "messages": []})
    assert not resumable("/v1/completions", {"prompt": "x"})
    assert resumable("/v1/completions", {"stream": True, "prompt": "x", "n": 2})
    assert not resumable("/v1/completions", {"stream": True, "prompt": "x", "best_of": 2})
    assert not resumable("/v1/completions", {"stream": True, "prompt": ["a", "b"]})
    tracker = StreamTracker()
    tracker.feed(token_ids_comment(0, [3, 4]) + _event(0, "hi"))
    body = json.loads(resume_body({"model": "m", "stream": True, "prompt": "x"}, tracker))
    assert body["servekit_resume"] == {"output_token_ids": [3, 4], "request_id": "cmpl-1",
                                       "created": 7}
    assert body["prompt"] == "x" and body["model"] == "m"


def test_num_tokens_counts_without_parsing() -> None:
    tracker = StreamTracker()
    tracker.feed(token_ids_comment(0, [1]) + b"\n" + token_ids_comment(0, [2, 3, 4]) + b"\n")
    assert tracker.num_tokens == 4 and tracker.token_ids == [1, 2, 3, 4]
    tracker.feed(token_ids_comment(0, [5]) + b"\n")
    assert tracker.num_tokens == 5 and tracker.token_ids == [1, 2, 3, 4, 5]


def _choice_event(i: int, text: str, finish: str | None = None) -> bytes:
    body = {"id": "cmpl-1", "created": 7,
            "choices": [{"index": i, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 999), min_size=1,
                                                      max_size=3)), max_size=20),
       st.lists(st.integers(0, 10_000), max_size=6))
def test_several_choices_keep_their_own_ids_and_finish(
        deltas: list[tuple[int, list[int]]], cuts: list[int]) -> None:
    """Interleaved choices, however split: each choice's ids in order, and which finished."""
    wire = b""
    finished: dict[int, str] = {}
    for n, (i, ids) in enumerate(deltas):
        last = all(j != i for j, _ in deltas[n + 1:]) and i != 1  # choice 1 never finishes
        wire += token_ids_comment(i, ids) + _choice_event(i, "x", "stop" if last else None)
        if last:
            finished[i] = "stop"
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    tracker = StreamTracker(3)
    for a, b in itertools.pairwise(points):
        tracker.feed(wire[a:b])
    for i in range(3):
        assert tracker.choice_token_ids(i) == [t for j, ids in deltas if j == i for t in ids]
    assert tracker.finished == finished
    assert tracker.num_tokens == sum(len(ids) for _, ids in deltas)
    body = json.loads(resume_body({"model": "m", "stream": True, "prompt": "x", "n": 3},
                                  tracker))
    assert body["servekit_resume"]["choices"] == [
        {"output_token_ids": tracker.choice_token_ids(i), "finish_reason": finished.get(i)}
        for i in range(3)]
