"""A sink worker: drains one sink's share of the outbox in batches, on its own thread.

Each pass takes a batch, writes it to the sink (which commits or raises), then acknowledges it;
a failure leaves the batch in the outbox and the worker backs off and retries. The worker is
started and stopped by its owner (the server's lifespan), never implicitly.
"""

from __future__ import annotations

import logging
import threading

from servekit.usage.outbox import Outbox
from servekit.usage.sink import UsageSink

log = logging.getLogger("servekit.usage")


class SinkWorker:
    """Delivers ``outbox`` rows to ``sink`` (registered in the outbox as ``name``)."""

    def __init__(self, outbox: Outbox, name: str, sink: UsageSink, *, batch_size: int = 1000,
                 interval_s: float = 0.5, max_backoff_s: float = 5.0) -> None:
        self.outbox = outbox
        self.name = name
        self.sink = sink
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.delivered = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a sink that takes stored rows skips building a record per row (the SQLite sink)
        self._write_rows = getattr(sink, "write_rows", None)

    def run_once(self) -> int:
        """One pass: deliver one batch; how many records it held (0 when idle). Raises what
        the sink raised (the batch stays in the outbox)."""
        batch = self.outbox.take(self.name, self.batch_size)
        if not batch.ids:
            return 0
        if self._write_rows is not None:
            self._write_rows(batch.rows)
        else:
            self.sink.write(batch.records)
        self.outbox.ack(self.name, batch.ids)
        self.delivered += len(batch.ids)
        return len(batch.ids)

    def drain(self) -> int:
        """Deliver until the outbox holds nothing ready for this sink; how many were sent."""
        total = 0
        while n := self.run_once():
            total += n
        return total

    def start(self) -> None:
        """Run :meth:`run_once` on a thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError(f"usage worker {self.name!r} already started")
        self._thread = threading.Thread(target=self._loop, name=f"usage-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last drain attempt, then close the sink."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.outbox.close()
        self.sink.close()

    def _loop(self) -> None:
        _name_os_thread(f"usage-{self.name}")
        backoff = self.interval_s
        while True:
            try:
                sent = self.run_once()
                backoff = self.interval_s
            except Exception as exc:  # the sink is down: keep the batch, retry later
                self.failures += 1
                log.warning("usage sink %r failed (%s: %s); retrying in %.1fs", self.name,
                            type(exc).__name__, exc, backoff)
                sent = 0
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if self._stop.is_set() and not sent:
                return
            # a full batch means a backlog: take the next at once; otherwise let records
            # gather for an interval, so a busy server pays the per-batch cost once per
            # interval rather than once per request
            if sent < self.batch_size and self._stop.wait(self.interval_s):
                continue  # loop once more: a last drain before stopping


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes) in the OS too, so per-thread tools
    (``top -H``, ``/proc/<pid>/task/*/comm``, py-spy) tell the sink worker apart; Linux only,
    best effort."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name.encode()[:15].decode(errors="ignore"))
    except OSError:
        pass
