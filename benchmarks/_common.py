"""Shared harness for the benchmark scripts, from :mod:`servekit.bench.report`.

Every ``bench_<part>.py`` takes ``--quick`` (under a minute) and ``--json PATH``, runs servekit
and its peer in the same process for several rounds, prints medians with min-max, and writes
``{"machine": ..., "rows": [...], "bars": {...}}``.
"""

import subprocess

from servekit.bench.report import (
    add_common_args,
    bar,
    fmt,
    machine_info,
    measure,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)

__all__ = ["add_common_args", "bar", "fmt", "machine_info", "measure", "parse_args",
           "print_bars", "print_table", "stop_process", "summary", "write_json"]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited 10 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
