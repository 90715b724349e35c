"""The usage flags of ``servekit serve`` and the ``servekit usage`` report."""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parser is built on every command: keep the serving path unimported
    from servekit.server.usage_path import UsageRecorder


def default_data_dir() -> Path:
    """``$SERVEKIT_DATA_DIR``, else ``~/.local/share/servekit``."""
    env = os.environ.get("SERVEKIT_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "servekit"


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """``--usage URL`` (repeatable), ``--data-dir``, the outbox's bound and policy."""
    serve.add_argument("--usage", action="append", default=None, metavar="URL",
                       help="usage sink (repeatable): sqlite://usage.db (default, in the data "
                            "dir), postgresql://..., clickhouse://host:8123/db, chdb://dir, or "
                            "a usage_sink plugin; 'none' turns usage recording off")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="where the usage outbox, the secret and sqlite:// sinks live "
                            f"(default: {default_data_dir()})")
    serve.add_argument("--usage-fail-open", action="store_true", default=None,
                       help="past the outbox's bound, keep serving and drop (and count) "
                            "records instead of refusing requests")
    serve.add_argument("--usage-max-rows", type=int, default=None,
                       help="outbox bound in undelivered records (default: 1000000)")
    serve.add_argument("--usage-max-age", type=float, default=None,
                       help="outbox bound: age in seconds of the oldest undelivered record")


def recorder_from_args(args: argparse.Namespace) -> UsageRecorder | None:
    """The recorder the flags ask for (None with ``--usage none``)."""
    from servekit.server.usage_path import UsageRecorder

    urls = list(args.usage or [])
    if urls == ["none"]:
        return None
    return UsageRecorder(args.data_dir or default_data_dir(), urls,
                         max_rows=args.usage_max_rows, max_age_s=args.usage_max_age,
                         fail_open=bool(args.usage_fail_open))


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
