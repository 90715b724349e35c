"""Sinks from URLs: ``sqlite:///path``, ``postgresql://...``, ``clickhouse://host:port/db``,
``chdb:///dir``; anything else is a ``usage_sink`` plugin spec (``NAME`` or ``NAME:{json}``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from servekit.usage.sink import UsageSink, make_usage_sink


def _path(url: str) -> Path:
    rest = url.split("://", 1)[1]
    return Path(rest if rest.startswith("/") else rest or ".")


def open_sink(url: str, data_dir: str | Path | None = None) -> UsageSink:
    """The sink ``url`` names; a relative SQLite/chDB path is resolved under ``data_dir``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    base = Path(data_dir) if data_dir is not None else Path.cwd()
    if scheme == "sqlite":
        from servekit.usage.sinks.sqlite import SQLiteSink

        return SQLiteSink(base / _path(url))
    if scheme in ("postgresql", "postgres"):
        from servekit.usage.sinks.postgres import PostgresSink

        return PostgresSink(url)
    if scheme == "clickhouse":
        from servekit.usage.sinks.clickhouse import ClickHouseSink, clickhouse_http

        return ClickHouseSink(clickhouse_http(url))
    if scheme == "chdb":
        from servekit.usage.sinks.clickhouse import ClickHouseSink, chdb_local

        return ClickHouseSink(chdb_local(base / _path(url)))
    return make_usage_sink(url)


def sink_name(url: str) -> str:
    """A stable name for the sink at ``url`` (the outbox tracks deliveries by it), without
    any password."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
