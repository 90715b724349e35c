"""The outbox: durable appends, delivery only after every sink committed, bounds and policies,
and a state machine over outbox + sinks with injected failures in which nothing is lost or
counted twice."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servekit.usage import Outbox, SinkWorker, UsageRecord
from servekit.usage.sinks.sqlite import SQLiteSink


def record(i: int, **kw: Any) -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", idempotency_key=f"k{i}",
                       time=datetime(2026, 5, 1, tzinfo=UTC), key_id="kid", tenant="t",
                       model="m", prompt_tokens=i, completion_tokens=2 * i, **kw)


def test_append_then_mark_delivers_with_final_chunk_flag(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["a"])
    sent, lost = box.append(record(1)), box.append(record(2))
    assert box.take("a").ids == ()  # unconfirmed rows of this process wait for their mark
    box.mark_sent(sent)
    box.mark_sent(lost, final_chunk_sent=False)
    batch = box.take("a")
    assert batch.ids == (sent, lost)
    assert [r.final_chunk_sent for r in batch.records] == [True, False]
    assert batch.records[0] == record(1, final_chunk_sent=True)


def test_a_dead_processs_log_is_adopted_with_its_marks(tmp_path: Path) -> None:
    """Rows and marks in the append log of a process that died before any fold reach the
    next process: a marked row with its mark, an unmarked one unconfirmed."""
    box = Outbox(tmp_path / "o.db", ["a"])
    box.append(record(1))
    box.mark_sent(box.append(record(2)))  # never folded: the process dies
    del box  # its log's lock goes with it, as with a killed process
    again = Outbox(tmp_path / "o.db", ["a"])
    assert again.stats().backlog == 2
    batch = again.take("a")
    assert [r.idempotency_key for r in batch.records] == ["k1", "k2"]
    assert [r.final_chunk_sent for r in batch.records] == [False, True]
    assert sorted(p.name for p in (tmp_path / "o.db.appends").iterdir()) == [
        f"{again._number}-0.seg", f"{again._number}.lock"]  # the dead log's files are gone


def test_a_mark_after_the_fold_updates_the_folded_row(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["a"])
    row = box.append(record(1))
    assert box.take("a").ids == ()  # folded, unmarked: waits
    box.mark_sent(row, final_chunk_sent=False)
    batch = box.take("a")
    assert batch.ids == (row,) and not batch.records[0].final_chunk_sent


def test_a_live_processs_unmarked_rows_wait_for_their_marks(tmp_path: Path) -> None:
    """Two outboxes on one file (two processes): neither delivers the other's unmarked rows
    as unconfirmed while the other is alive."""
    one, two = Outbox(tmp_path / "o.db", ["a"]), Outbox(tmp_path / "o.db", ["a"])
    row = one.append(record(1))
    one.flush()
    assert two.take("a").ids == ()
    one.mark_sent(row)
    one.flush()
    batch = two.take("a")
    assert batch.ids == (row,) and batch.records[0].final_chunk_sent


def test_a_sibling_that_dies_is_adopted_by_a_live_outboxs_takes(tmp_path: Path) -> None:
    """A process sharing the outbox is killed and not restarted: another live process's
    sink worker adopts its log (rows and marks) within ``adopt_every_s``."""
    live, sibling = Outbox(tmp_path / "o.db", ["a"]), Outbox(tmp_path / "o.db", ["a"])
    sibling.mark_sent(sibling.append(record(1)))
    sibling.append(record(2))
    del sibling  # killed: its log's lock goes with it
    assert live.take("a").ids == ()  # not yet looked for
    live.adopt_every_s = 0.0
    batch = live.take("a")
    assert [(r.idempotency_key, r.final_chunk_sent) for r in batch.records] == [
        ("k1", True), ("k2", False)]
    assert live.stats().backlog == 2
    live.ack("a", batch.ids)
    assert live.stats().backlog == 0


def test_the_log_goes_on_across_segments_and_drops_read_ones(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["a"], log_segment_bytes=4096)  # ~20 rows a segment
    rows = [box.append(record(i)) for i in range(100)]
    for row in rows:
        box.mark_sent(row)
    batch = box.take("a", limit=1000)
    assert batch.ids == tuple(rows)
    assert [r.prompt_tokens for r in batch.records] == list(range(100))
    segments = sorted((tmp_path / "o.db.appends").glob("*.seg"))
    assert len(segments) == 1  # the read ones are deleted; the one being written stays
    box.ack("a", batch.ids)
    more = [box.append(record(i)) for i in range(100, 130)]
    del box
    again = Outbox(tmp_path / "o.db", ["a"])
    assert [r.prompt_tokens for r in again.take("a", limit=1000).records] == list(
        range(100, 130))
    assert set(more) == set(again.take("a", limit=1000).ids)


def test_a_torn_entry_ends_a_dead_log(tmp_path: Path) -> None:
    """A writer killed mid-store leaves a partial entry: the entries before it are adopted,
    it is not."""
    box = Outbox(tmp_path / "o.db", ["a"])
    box.append(record(1))
    box.append(record(2))
    number = box._number
    del box
    segment = tmp_path / "o.db.appends" / f"{number}-0.seg"
    data = bytearray(segment.read_bytes())
    data[data.index(b"k2") + 1] ^= 0xFF  # inside the second entry's payload
    segment.write_bytes(bytes(data))
    again = Outbox(tmp_path / "o.db", ["a"])
    assert [r.idempotency_key for r in again.take("a").records] == ["k1"]


def test_row_deleted_only_when_every_sink_acked(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["a", "b"])
    box.mark_sent(box.append(record(1)))
    ids = box.take("a").ids
    box.ack("a", ids)
    assert box.take("a").ids == () and box.take("b").ids == ids
    assert box.stats().backlog == 1
    box.ack("b", ids)
    assert box.stats().backlog == 0 and box.take("b").ids == ()


def test_appends_never_checkpoint_and_acks_keep_the_wal_bounded(tmp_path: Path) -> None:
    """The serving path only writes the WAL (a checkpoint there stalls the event loop for
    milliseconds); the sink side's acks checkpoint, so a drained outbox's WAL stays small."""
    path = tmp_path / "o.db"
    box = Outbox(path, ["a"])
    main_size = path.stat().st_size
    for i in range(3000):  # ~3 MB of WAL frames: past SQLite's 1000-page autocheckpoint
        box.mark_sent(box.append(record(i)))
    assert path.stat().st_size == main_size  # nothing copied back into the database file
    wal = Path(f"{path}-wal")
    for rnd in range(20):
        for i in range(300):
            box.mark_sent(box.append(record(10_000 + rnd * 300 + i)))
        batch = box.take("a", limit=10_000)
        box.ack("a", batch.ids)
    assert box.stats().backlog == 0
    grown = wal.stat().st_size
    for rnd in range(20):  # the WAL is reused after each checkpoint: it does not keep growing
        for i in range(300):
            box.mark_sent(box.append(record(20_000 + rnd * 300 + i)))
        box.ack("a", box.take("a", limit=10_000).ids)
    assert wal.stat().st_size <= grown


def test_fail_closed_stops_admitting_past_the_row_bound(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(tmp_path / "o.db", ["a"], max_rows=2)
    ids = [box.append(record(1))]
    assert box.admitting()
    ids.append(box.append(record(2)))
    assert not box.admitting() and box.stats().over_bound
    ids.append(box.append(record(3)))
    assert ids[-1] is not None  # an admitted request is still recorded
    assert "refusing new requests" in caplog.text
    for row in ids:
        box.mark_sent(row)
    box.ack("a", box.take("a").ids)
    assert box.admitting()


def test_fail_open_drops_and_counts_past_the_age_bound(tmp_path: Path) -> None:
    now = [1000.0]
    box = Outbox(tmp_path / "o.db", ["a"], max_age_s=60, fail_open=True, clock=lambda: now[0])
    assert box.append(record(1)) is not None
    now[0] += 61
    assert box.admitting()  # fail-open keeps serving
    assert box.append(record(2)) is None
    assert box.stats().dropped == 1 and box.stats().oldest_age_s == pytest.approx(61)


def test_worker_retries_until_the_sink_takes_the_batch(tmp_path: Path) -> None:
    sink = FlakySink(SQLiteSink(tmp_path / "s.db"))
    box = Outbox(tmp_path / "o.db", ["s"])
    for i in range(5):
        box.mark_sent(box.append(record(i)))
    worker = SinkWorker(box, "s", sink, batch_size=2)
    sink.fail_next = "write"
    with pytest.raises(OSError):
        worker.run_once()
    assert worker.drain() == 5 and box.stats().backlog == 0
    assert sorted(r.idempotency_key for r in sink.inner.read_all()) == [f"k{i}" for i in range(5)]


class FlakySink:
    """A real SQLite sink that fails on demand: before writing, or after committing (the
    caller sees an error although the batch is stored)."""

    def __init__(self, inner: SQLiteSink) -> None:
        self.inner = inner
        self.fail_next: str | None = None

    def write(self, batch: Any) -> None:
        mode, self.fail_next = self.fail_next, None
        if mode == "write":
            raise OSError("injected: write failed")
        self.inner.write(batch)
        if mode == "commit":
            raise OSError("injected: committed, but the reply was lost")

    def close(self) -> None:
        self.inner.close()


SINKS = ("pg", "ch")


class OutboxMachine(RuleBasedStateMachine):
    """Appends, marks, deliveries that fail in every way, crashes and restarts: each sink ends
    up holding every appended record exactly once, and until then every record is either in
    the sink or still waiting in the outbox for it."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="servekit-outbox-sm-"))
        self.sinks = {n: FlakySink(SQLiteSink(self.dir / f"{n}.db")) for n in SINKS}
        self.box = Outbox(self.dir / "outbox.db", SINKS)
        self.appended: dict[str, int] = {}
        self.unmarked: list[int] = []
        self.n = 0

    @rule(count=st.integers(1, 4))
    def append(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            row = self.box.append(record(self.n))
            assert row is not None
            self.appended[f"k{self.n}"] = self.n
            self.unmarked.append(row)

    @precondition(lambda self: self.unmarked)
    @rule(sent=st.booleans())
    def mark(self, sent: bool) -> None:
        self.box.mark_sent(self.unmarked.pop(0), sent)

    @rule(sink=st.sampled_from(SINKS), failure=st.sampled_from(
        [None, "write", "commit", "crash_before_ack"]), size=st.integers(1, 5))
    def deliver(self, sink: str, failure: str | None, size: int) -> None:
        batch = self.box.take(sink, size)
        if not batch.ids:
            return
        target = self.sinks[sink]
        target.fail_next = failure if failure in ("write", "commit") else None
        try:
            target.write(batch.records)
        except OSError:
            return
        if failure != "crash_before_ack":
            self.box.ack(sink, batch.ids)

    @rule(fresh=st.integers(0, 3))
    def crash_and_restart(self, fresh: int) -> None:
        # rows appended just before the crash are only in the log; the next process adopts
        # it; rows never marked become deliverable, unconfirmed
        self.append(fresh) if fresh else None
        self.box = None  # type: ignore[assignment]  # dropped unclosed: its log's lock goes
        self.box = Outbox(self.dir / "outbox.db", SINKS)
        self.unmarked.clear()

    def _waiting(self, sink: str) -> set[str]:
        db = sqlite3.connect(self.dir / "outbox.db")
        try:
            rows = db.execute("SELECT idempotency_key FROM outbox o WHERE NOT "
                              "EXISTS (SELECT 1 FROM delivered d WHERE d.id = o.id AND "
                              "d.sink = ?)", (sink,)).fetchall()
        finally:
            db.close()
        return {r[0] for r in rows}

    @invariant()
    def nothing_lost_nothing_doubled(self) -> None:
        self.box.flush()  # what is still only in the log, into the table _waiting reads
        for name, sink in self.sinks.items():
            stored = sink.inner.read_all()
            keys = [r.idempotency_key for r in stored]
            assert len(keys) == len(set(keys))
            assert set(keys) | self._waiting(name) == set(self.appended)
            for r in stored:
                assert r.prompt_tokens == self.appended[r.idempotency_key]

    def teardown(self) -> None:
        for row in self.unmarked:
            self.box.mark_sent(row)
        for name, sink in self.sinks.items():
            SinkWorker(self.box, name, sink).drain()
            stored = sink.inner.read_all()
            assert sorted(r.idempotency_key for r in stored) == sorted(self.appended)
            assert sum(r.prompt_tokens for r in stored) == sum(self.appended.values())
            sink.close()
        assert self.box.stats().backlog == 0
        self.box.close()


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)


def test_an_outbox_of_the_json_layout_is_migrated_with_its_rows(tmp_path: Path) -> None:
    """Rows a previous servekit left in the first layout (JSON payloads) are still delivered."""
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE outbox (id INTEGER PRIMARY KEY, epoch TEXT NOT NULL,
        created REAL NOT NULL, confirmed INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL);
        CREATE TABLE delivered (id INTEGER NOT NULL, sink TEXT NOT NULL,
        PRIMARY KEY (id, sink)) WITHOUT ROWID;""")
    row = ["k7", "r7", "2026-05-01T00:00:00+00:00", "kid", "t", "m", "", 7, 0, 14, None, 200,
           None, None, 0.0, True, True]
    db.execute("INSERT INTO outbox VALUES (5, 'old', 1.0, 1, ?)", (json.dumps(row),))
    db.commit()
    db.close()
    box = Outbox(path, ["a"])
    batch = box.take("a")
    assert batch.ids == (5,)
    assert batch.records[0] == record(7, final_chunk_sent=True)
    row = box.append(record(8))
    box.mark_sent(row)
    assert box.take("a").ids == (5, row)

