"""The usage flags of ``servekit serve`` and the ``servekit usage`` report."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from servekit.usage.cli import add_usage_flags, default_data_dir, recorder_from_args

__all__ = ["add_report_command", "add_serve_flags", "default_data_dir", "recorder_from_args",
           "report"]

#: ``servekit serve``'s usage flags (shared with ``servekit gateway``).
add_serve_flags = add_usage_flags


def add_report_command(sub: Any) -> None:
    """``servekit usage``: totals from a sink."""
    report = sub.add_parser("usage", help="usage totals from a sink")
    report.add_argument("--db", required=True, metavar="URL",
                        help="sink URL: sqlite:///path, postgresql://..., clickhouse://..., "
                             "chdb:///dir")
    report.add_argument("--since", default=None, help="ISO date/time, UTC (default: 30 days ago)")
    report.add_argument("--until", default=None, help="ISO date/time, UTC (default: now)")
    report.add_argument("--by", default="tenant,model,day",
                        help="comma-separated: tenant, key_id, model, day")
    report.add_argument("--json", action="store_true", help="JSON rows instead of a table")


def _when(text: str | None, default: datetime) -> datetime:
    if text is None:
        return default
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def report(args: argparse.Namespace) -> str:
    """The totals table (or JSON) ``servekit usage`` prints."""
    from servekit.usage import open_sink

    now = datetime.now(UTC)
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    sink: Any = open_sink(args.db)
    try:
        if not hasattr(sink, "totals"):
            raise ValueError(f"--db: the sink {type(sink).__name__} cannot report totals")
        rows = sink.totals(_when(args.since, now - timedelta(days=30)),
                           _when(args.until, now + timedelta(seconds=1)), by)
    finally:
        sink.close()
    names = [*by, "requests", "prompt_tokens", "cached_tokens", "completion_tokens"]
    if args.json:
        return json.dumps([dict(zip(names, r, strict=True)) for r in rows])
    table = [names, *[["" if v is None else str(v) for v in r] for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(names))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)
