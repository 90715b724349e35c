"""servekit.usage: per-request usage records, the durable outbox, and the sinks that store them.

The serving path appends each finished request's :class:`UsageRecord` to the :class:`Outbox`
(a per-process memory-mapped append log, folded into a local SQLite table in WAL mode); a
:class:`SinkWorker` per sink drains it in batches and deletes rows only after every sink
committed them. Sinks: SQLite (embedded default), PostgreSQL (the ledger),
ClickHouse over HTTP and chDB in-process (analytics), or a ``usage_sink`` plugin.
:class:`UsageRecorder` ties them together for a serving tier (the server, or the gateway).
"""

from servekit.usage.outbox import Batch, Outbox, OutboxStats
from servekit.usage.recorder import UsageRecorder
from servekit.usage.sink import UsageRecord, UsageSink, make_usage_sink
from servekit.usage.sinks import open_sink, sink_name
from servekit.usage.worker import SinkWorker

__all__ = ["Batch", "Outbox", "OutboxStats", "SinkWorker", "UsageRecord", "UsageRecorder",
           "UsageSink", "make_usage_sink", "open_sink", "sink_name"]
