"""The usage flags shared by ``servekit serve`` and ``servekit gateway``: ``--usage URL``
(repeatable), ``--data-dir``, the outbox's bound and its policy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built on every command: keep the serving path unimported
    from servekit.usage.recorder import UsageRecorder

__all__ = ["add_usage_flags", "default_data_dir", "recorder_from_args"]


def default_data_dir() -> Path:
    """``$SERVEKIT_DATA_DIR``, else ``~/.local/share/servekit``."""
    env = os.environ.get("SERVEKIT_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "servekit"


def add_usage_flags(parser: argparse.ArgumentParser) -> None:
    """``--usage URL`` (repeatable), ``--data-dir``, the outbox's bound and policy."""
    parser.add_argument("--usage", action="append", default=None, metavar="URL",
                        help="usage sink (repeatable): sqlite://usage.db (default, in the data "
                             "dir), postgresql://..., clickhouse://host:8123/db, chdb://dir, "
                             "or a usage_sink plugin; 'none' turns usage recording off")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the usage outbox, the secret and sqlite:// sinks live "
                             f"(default: {default_data_dir()})")
    parser.add_argument("--usage-fail-open", action="store_true", default=None,
                        help="past the outbox's bound, keep serving and drop (and count) "
                             "records instead of refusing requests")
    parser.add_argument("--usage-max-rows", type=int, default=None,
                        help="outbox bound in undelivered records (default: 1000000)")
    parser.add_argument("--usage-max-age", type=float, default=None,
                        help="outbox bound: age in seconds of the oldest undelivered record "
                             "(default: 7 days)")


def recorder_from_args(args: argparse.Namespace, *,
                       outbox: str = "usage-outbox.db") -> UsageRecorder | None:
    """The recorder the flags ask for (None with ``--usage none``); ``outbox``: its file
    name in the data directory."""
    from servekit.usage.recorder import UsageRecorder

    urls = list(args.usage or [])
    if urls == ["none"]:
        return None
    max_rows, max_age = args.usage_max_rows, args.usage_max_age
    return UsageRecorder(args.data_dir or default_data_dir(), urls, outbox=outbox,
                         max_rows=1_000_000 if max_rows is None else max_rows,
                         max_age_s=7 * 86400.0 if max_age is None else max_age,
                         fail_open=bool(args.usage_fail_open))
