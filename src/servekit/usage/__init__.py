"""servekit.usage: per-request usage records and the sinks that store them.

The ledger itself (outbox, built-in sinks) comes later; this package holds the record and the
:class:`UsageSink` interface plugins implement.
"""

from servekit.usage.sink import UsageRecord, UsageSink, make_usage_sink

__all__ = ["UsageRecord", "UsageSink", "make_usage_sink"]
