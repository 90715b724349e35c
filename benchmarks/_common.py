"""Shared harness for the benchmark scripts, from :mod:`servekit.bench.report`.

Every ``bench_<part>.py`` takes ``--quick`` (under a minute) and ``--json PATH``, runs servekit
and its peer in the same process for several rounds, prints medians with min-max, and writes
``{"machine": ..., "rows": [...], "bars": {...}}``.
"""

import os
import subprocess
from collections.abc import Callable

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
           "pin_cpus", "print_bars", "print_table", "stop_process", "summary", "write_json"]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited 10 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def pin_cpus(pin: bool) -> tuple[Callable[[], None] | None, list[int]]:
    """Split this machine's CPUs between a server and its load generator: a ``preexec_fn``
    that puts the server's process on the first CPU, and the CPUs this process (the load
    generator) moves to now, so its work never runs on the server's core; ``(None, [])`` when
    ``pin`` is false or there is one CPU. Undo with ``os.sched_setaffinity(0, all_cpus)``."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, []
    os.sched_setaffinity(0, cpus[1:])
    return (lambda: os.sched_setaffinity(0, cpus[:1])), cpus[1:]
