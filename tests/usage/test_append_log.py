"""The append log in front of the outbox: what is appended is read back once, in order,
across segments and however the reads are cut; one writer per log; a forked child cannot
write to its parent's log; bad sizes are clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.usage.append_log import AppendLog, adoptable, read_entries, release_segments

_values = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62),
                    st.floats(allow_nan=False), st.text(max_size=300))
_entries = st.lists(st.tuples(st.integers(0, 2**50), _values, _values), max_size=120)


@settings(max_examples=60, deadline=None)
@given(entries=_entries, cuts=st.lists(st.integers(0, 120), max_size=6),
       segment_bytes=st.sampled_from([4096, 8192, 1 << 20]))
def test_entries_come_back_once_in_order_however_reads_are_cut(
        entries: list[tuple[Any, ...]], cuts: list[int], segment_bytes: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="servekit-log-"))
    log = AppendLog(directory, 7, segment_bytes=segment_bytes)
    read: list[tuple[Any, ...]] = []
    position = (0, 0)
    done = 0
    for cut in sorted({min(c, len(entries)) for c in cuts} | {len(entries)}):
        log.append(entries[done:cut])  # a batch: empty, one or many entries
        done = cut
        more, position = read_entries(directory, 7, position)
        read += more
        release_segments(directory, 7, position)
    assert read == entries
    assert read_entries(directory, 7, position) == ([], position)
    assert len(list(directory.glob("7-*.seg"))) == 1  # only the one being written is left
    log.close()


def test_one_writer_per_log_and_a_closed_log_is_adoptable(tmp_path: Path) -> None:
    log = AppendLog(tmp_path, 1)
    with pytest.raises(RuntimeError, match="exists already"):
        AppendLog(tmp_path, 1)
    assert list(adoptable(tmp_path)) == []  # its writer is alive
    log.append([(1, "a")])
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append([(2, "b")])
    [(number, held)] = list(adoptable(tmp_path))
    assert number == 1 and read_entries(tmp_path, 1, (0, 0))[0] == [(1, "a")]
    held.close()


def test_a_forked_child_cannot_append_to_its_parents_log(tmp_path: Path) -> None:
    log = AppendLog(tmp_path, 1)
    log.append([(1, "parent")])
    pid = os.fork()
    if pid == 0:  # the child: its copy of the log must refuse
        try:
            log.append([(2, "child")])
        except RuntimeError:
            os._exit(0)
        os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    log.append([(3, "parent")])
    assert read_entries(tmp_path, 1, (0, 0))[0] == [(1, "parent"), (3, "parent")]
    assert list(adoptable(tmp_path)) == []  # the child closed its copy; the parent holds it
    log.close()


def test_bad_sizes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="segment_bytes"):
        AppendLog(tmp_path, 1, segment_bytes=1000)
    log = AppendLog(tmp_path, 2, segment_bytes=4096)
    with pytest.raises(ValueError, match="exceeds"):
        log.append([("first",), ("x" * 5000,)])  # nothing of a batch that cannot fit
    log.append([("fits",)])
    assert read_entries(tmp_path, 2, (0, 0))[0] == [("fits",)]
    log.close()
