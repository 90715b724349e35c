"""The serving path's outbox writes under SIGKILL and with several processes on one outbox:
appends and marks survive the kill with no SQL on the serving path; two processes appending
to one outbox concurrently, one killed, lose nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from servekit.usage import Outbox, SinkWorker
from servekit.usage.sinks.sqlite import SQLiteSink

_SERVING = r"""
import json, os, signal, sys
from servekit.usage.record_codec import make_row
from servekit.usage.recorder import UsageRecorder

recorder = UsageRecorder(sys.argv[1], secret=b"s" * 32, replica="r0")
statements = []
recorder.outbox._db().set_trace_callback(statements.append)

def row(i):
    return make_row(f"k{i}", f"r{i}", "2026-12-06T00:00:00+00:00", "kid", "t", "m", "r0", i,
                    0, 2 * i, "length", 200, None, 0.01, 0.02, False, True)

ids = [recorder.append_row(row(i)) for i in range(1, 6)]
for i in ids[:3]:
    recorder.mark_sent(i, final_chunk_sent=i != ids[2])
print(json.dumps({"ids": ids, "statements": statements}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no fold: what a crash leaves
"""

_WRITER = r"""
import json, os, random, signal, sys
from servekit.usage import Outbox
from servekit.usage.record_codec import make_row

box = Outbox(sys.argv[1], ["s"])
name, n, kill = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "kill"
rng = random.Random(name)
i = 0
while i < n:
    size = min(rng.randint(1, 6), n - i)
    rows = [make_row(f"{name}-{j}", f"{name}-{j}", "2026-12-06T00:00:00+00:00", None, None,
                     "m", name, j, 0, 1, "length", 200, None, None, 0.0, False, True)
            for j in range(i, i + size)]
    for row_id in box.append_rows(rows):
        box.mark_sent(row_id)
    print(i + size, flush=True)  # appended: these rows must not be lost
    i += size
    if i % 60 == 0:
        box.flush()
if kill:
    os.kill(os.getpid(), signal.SIGKILL)
box.close()
"""


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_appends_and_marks_survive_sigkill_without_a_sql_statement(tmp_path: Path) -> None:
    """The serving path's appends and marks go to the append log only (no SQLite statement
    per request); killed before any fold, the next process adopts every row with its mark."""
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-c", _SERVING, str(data)], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    out = json.loads(done.stdout)
    assert len(set(out["ids"])) == 5 and None not in out["ids"]
    assert out["statements"] == []
    box = Outbox(data / "usage-outbox.db", ["sqlite"])
    batch = box.take("sqlite")
    by_key = {r.idempotency_key: r for r in batch.records}
    assert sorted(by_key) == [f"k{i}" for i in range(1, 6)]
    assert sorted(batch.ids) == sorted(out["ids"])
    assert [by_key[f"k{i}"].final_chunk_sent for i in range(1, 6)] == [
        True, True, False, False, False]  # two marked sent, one unsent, two never marked
    assert [by_key[f"k{i}"].prompt_tokens for i in range(1, 6)] == [1, 2, 3, 4, 5]


def test_two_processes_on_one_outbox_lose_nothing_when_one_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path, ["s"]).close()  # the file exists before both start
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), name, "300", kill], env=_env(),
        stdout=subprocess.PIPE, text=True) for name, kill in (("a", "kill"), ("b", "keep"))}
    appended = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        appended[name] = int(out.split()[-1])
    assert procs["a"].returncode == -9 and procs["b"].returncode == 0
    assert appended == {"a": 300, "b": 300}
    box = Outbox(path, ["s"])
    sink = SQLiteSink(tmp_path / "sink.db")
    SinkWorker(box, "s", sink).drain()
    stored = sink.read_all()
    keys = sorted(r.idempotency_key for r in stored)
    assert keys == sorted(f"{n}-{j}" for n in "ab" for j in range(300))  # once each
    by_key = {r.idempotency_key: r for r in stored}
    assert all(by_key[f"b-{j}"].final_chunk_sent for j in range(300))  # b closed cleanly
    assert all(by_key[f"{n}-{j}"].prompt_tokens == j for n in "ab" for j in range(300))
    assert box.stats().backlog == 0
