"""The outbox's front: a per-process append-only log in memory-mapped segment files.

An append must survive a killed process before the response's final chunk goes out. A store
into a shared file mapping does: once the store returns, the bytes are in the page cache,
which outlives the process (not a power cut: the same promise as SQLite's WAL with
``synchronous=NORMAL``). It costs ~1 us in a loop (~4 in a serving process), where the SQLite
commit per request it replaced cost ~33 us in a serving process; the outbox folds the log into
its SQLite table in batches, off the serving path.

Each log is one writer's (one :class:`~servekit.usage.outbox.Outbox` in one process), named
by a number the outbox's database hands out, and holds an exclusive ``flock`` on its lock
file for as long as it is open: a lock file nobody holds is a dead writer's log, which another
process adopts. A segment file starts with a header (magic, the ``marshal`` format version);
then entries, each ``[u32 length][u32 crc32][payload]`` with the payload a marshalled tuple.
The writer stores the payload first and its length last, so a reader sees a whole entry or a
zero length (the file is zero-filled: nothing written yet); a writer killed between the two
leaves a zero length, one killed mid-store a CRC mismatch, and either ends the log there. A
length of ``0xFFFFFFFF`` says the log goes on in the next segment.
"""

from __future__ import annotations

import fcntl
import marshal
import mmap
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["AppendLog", "LogPosition", "adoptable", "read_entries", "release_segments",
           "remove_log"]

_MAGIC = b"SKUL"
_HEADER = struct.Struct("<4sI")  # magic, marshal format version
_ENTRY = struct.Struct("<II")  # payload length, crc32 of the payload
_NEXT_SEGMENT = 0xFFFFFFFF
_START = _HEADER.size

#: Where a reader of a log stands: (segment number, byte offset in that segment).
LogPosition = tuple[int, int]


def _segment(directory: Path, number: int, segment: int) -> Path:
    return directory / f"{number}-{segment}.seg"


def _lock_file(directory: Path, number: int) -> Path:
    return directory / f"{number}.lock"


class AppendLog:
    """Log ``number`` in ``directory``, open for appending by this process (thread-safe).

    ``segment_bytes`` sizes each segment file; its space is allocated when the segment is
    made, so a full disk is an :class:`OSError` there, never a ``SIGBUS`` on a store."""

    def __init__(self, directory: Path, number: int, *, segment_bytes: int = 4 << 20) -> None:
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be >= 4096, got {segment_bytes}")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.number = number
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        # the lock file appears already locked (made under another name, then renamed), so no
        # adopter can take a live log for a dead one between its creation and its flock
        final = _lock_file(directory, number)
        if final.exists():
            raise RuntimeError(f"append log {number} in {directory} exists already")
        making = directory / f"{number}.lock-{os.getpid()}-{threading.get_ident()}"
        self._held = open(making, "wb")  # noqa: SIM115 (held open)
        fcntl.flock(self._held, fcntl.LOCK_EX)
        os.rename(making, final)
        self._map: mmap.mmap | None = None
        self._segment = -1
        self._offset = 0
        self._open_segment(0)
        _OPEN.add(self)

    def append(self, entries: list[tuple[Any, ...]]) -> None:
        """Store ``entries`` (tuples of str, int, float, bool, None), in order; durable against
        a killed process once this returns."""
        payloads = [marshal.dumps(e) for e in entries]
        room = self.segment_bytes - _START - 2 * _ENTRY.size  # an entry and a next-segment mark
        for payload in payloads:
            if len(payload) > room:
                raise ValueError(f"an entry of {len(payload)} bytes exceeds the log's segment "
                                 f"({self.segment_bytes} bytes)")
        with self._lock:
            if self._map is None:
                raise RuntimeError(f"append log {self.number} is closed (or this is a forked "
                                   "child: a log is its process's own)")
            for payload in payloads:
                size = len(payload)
                if self._offset + size + 2 * _ENTRY.size > self.segment_bytes:
                    self._next_segment()
                start, m = self._offset, self._map
                assert m is not None
                body = start + _ENTRY.size
                m[body:body + size] = payload
                _ENTRY.pack_into(m, start, size, zlib.crc32(payload))  # the length last
                self._offset = body + size

    def close(self) -> None:
        """Unmap the segment and release the lock (what was stored stays on disk)."""
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
            if not self._held.closed:
                self._held.close()  # releases the flock

    def _next_segment(self) -> None:
        old, at = self._map, self._offset
        assert old is not None
        self._open_segment(self._segment + 1)
        _ENTRY.pack_into(old, at, _NEXT_SEGMENT, 0)  # the next segment exists first
        old.close()

    def _open_segment(self, segment: int) -> None:
        path = _segment(self.directory, self.number, segment)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self.segment_bytes)
            else:  # macOS: a sparse file (a full disk then faults on a store)
                os.ftruncate(fd, self.segment_bytes)
            new = mmap.mmap(fd, self.segment_bytes)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the file
        _HEADER.pack_into(new, 0, _MAGIC, marshal.version)
        self._map, self._segment, self._offset = new, segment, _START


_OPEN: weakref.WeakSet[AppendLog] = weakref.WeakSet()


def _close_in_child() -> None:
    """A forked child shares its parent's mappings: its stores would interleave with the
    parent's, so its copies of the logs are unusable (without a syscall per append)."""
    for append_log in list(_OPEN):
        append_log._map = None
        append_log._held.close()  # the parent's descriptor still holds the lock


os.register_at_fork(after_in_child=_close_in_child)


def read_entries(directory: Path, number: int,
                 position: LogPosition) -> tuple[list[tuple[Any, ...]], LogPosition]:
    """The entries of log ``number`` after ``position``, and the position after the last
    whole one (a writer may be appending meanwhile: what it has not finished is not read)."""
    entries: list[tuple[Any, ...]] = []
    segment, offset = position
    while True:
        path = _segment(directory, number, segment)
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m[:4] != _MAGIC:  # made, not yet headed (a writer killed in between)
                    return entries, (segment, offset)
                version = _HEADER.unpack_from(m)[1]
                if version != marshal.version:
                    raise RuntimeError(
                        f"{path} was written by a Python whose marshal format is {version} "
                        f"(this one's is {marshal.version}): drain it with that Python")
                offset, more = _read_segment(m, max(offset, _START), entries)
        except (FileNotFoundError, ValueError):  # not made yet, or made empty
            return entries, (segment, offset)
        if not more:
            return entries, (segment, offset)
        segment, offset = segment + 1, _START


def _read_segment(m: mmap.mmap, offset: int, entries: list[tuple[Any, ...]]) -> tuple[int, bool]:
    """Append to ``entries`` what the segment holds from ``offset`` to its first unwritten or
    torn entry; (the offset after the last whole one, whether the log goes on in the next
    segment)."""
    unpack, crc32, loads = _ENTRY.unpack_from, zlib.crc32, marshal.loads
    end = len(m)
    while offset + _ENTRY.size <= end:
        size, crc = unpack(m, offset)
        if size == _NEXT_SEGMENT:
            return offset, True
        body = offset + _ENTRY.size
        if size == 0 or body + size > end:
            break
        payload = m[body:body + size]
        if crc32(payload) != crc:
            break
        entries.append(loads(payload))
        offset = body + size
    return offset, False


def release_segments(directory: Path, number: int, position: LogPosition) -> None:
    """Delete the segments of log ``number`` before ``position`` (all read and stored)."""
    for path in directory.glob(f"{number}-*.seg"):
        if int(path.stem.split("-")[1]) < position[0]:
            path.unlink(missing_ok=True)


def adoptable(directory: Path) -> Iterator[tuple[int, Any]]:
    """The logs in ``directory`` whose writer is gone: (number, the lock held for the
    caller, to pass to :func:`remove_log` once their entries are stored)."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.lock")):
        try:
            held = open(path, "rb")  # noqa: SIM115 (held until remove_log)
        except FileNotFoundError:  # adopted and removed meanwhile
            continue
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive (or another process is adopting it)
            held.close()
            continue
        if not path.exists():  # adopted and removed meanwhile
            held.close()
            continue
        yield int(path.stem), held


def remove_log(directory: Path, number: int, held: Any) -> None:
    """Delete an adopted log's files and release its lock."""
    for path in directory.glob(f"{number}-*.seg"):
        path.unlink(missing_ok=True)
    _lock_file(directory, number).unlink(missing_ok=True)
    held.close()
