"""The outbox's merging never loses, duplicates or reorders a delta (a stateful machine)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from servekit.engine.outputs import RequestOutput
from servekit.protocol.grpc_gen import servekit_pb2 as pb
from servekit.server.grpc.outbox import Outbox

KEYS = st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 1))


def now(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that must not block (the outbox is under its limit)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("put blocked below the limit")


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.outbox = Outbox(limit=10_000)
        self.sent: dict[tuple[str, int], list[int]] = {}     # token ids put, per key
        self.written: dict[tuple[str, int], list[int]] = {}  # token ids taken, per key
        self.finished: set[tuple[str, int]] = set()
        self.next_token = 0

    # request "a" sends bare chunks (GenerateStream: key = choice); "b" and "c" session responses
    @rule(key=KEYS, n=st.integers(1, 3))
    def delta(self, key: tuple[str, int], n: int) -> None:
        if key in self.finished:
            return
        ids = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        out = RequestOutput(key[0], ids, "".join(f"<{i}>" for i in ids), False, None, 1,
                            ids[-1] + 1, 0)

        def chunk(o: RequestOutput) -> pb.GenerateChunk:
            return pb.GenerateChunk(index=key[1], text=o.new_text, token_ids=o.new_token_ids)

        if key[0] == "a":
            now(self.outbox.put_delta(key[1], out, chunk))
        else:
            now(self.outbox.put_delta(key, out, lambda o: pb.SessionResponse(
                request_id=key[0], chunk=chunk(o))))
        self.sent.setdefault(key, []).extend(ids)

    @rule(key=KEYS)
    def finish(self, key: tuple[str, int]) -> None:
        if key in self.finished:
            return
        self.finished.add(key)
        final = pb.GenerateChunk(index=key[1], final=True)
        now(self.outbox.put(final if key[0] == "a" else
                            pb.SessionResponse(request_id=key[0], final=True, chunk=final)))

    @rule()
    def write(self) -> None:
        for message in self.outbox.take():
            if isinstance(message, pb.SessionResponse):
                chunk, key = message.chunk, (message.request_id, message.chunk.index)
            else:
                chunk, key = message, ("a", message.index)
            if chunk.final:
                assert self.written.get(key, []) == self.sent.get(key, []), "final overtook"
                continue
            assert chunk.text == "".join(f"<{i}>" for i in chunk.token_ids)
            self.written.setdefault(key, []).extend(chunk.token_ids)

    @invariant()
    def written_is_a_prefix_of_sent(self) -> None:
        for key, ids in self.written.items():
            assert self.sent[key][:len(ids)] == ids

    @rule()
    def flush_all(self) -> None:
        self.write()
        assert self.written == self.sent


TestOutbox = OutboxMachine.TestCase
TestOutbox.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
