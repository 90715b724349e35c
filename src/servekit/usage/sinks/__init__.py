"""The built-in usage sinks (SQLite, PostgreSQL, ClickHouse, chDB) and ``open_sink(url)``."""

from servekit.usage.sinks.urls import open_sink, sink_name

__all__ = ["open_sink", "sink_name"]
