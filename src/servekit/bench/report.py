"""Reporting for benchmarks: arguments, machine info, rounds, medians, tables, JSON.

Every measurement (``benchmarks/bench_<part>.py`` and ``python -m servekit.bench``) takes
``--quick`` (under a minute) and ``--json PATH``, runs servekit and its peer in the same process
for several rounds, prints medians with min-max, and writes
``{"machine": ..., "rows": [...], "bars": {...}}`` (the harness adds ``"ratios"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The standard arguments: ``--quick``, ``--json PATH``, ``--rounds N``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")


def parse_args(description: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the standard arguments (and ``extra``'s) of a benchmark script."""
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def machine_info() -> dict[str, Any]:
    """CPU count, Python, platform, torch and the GPU name when there is one."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def measure(fn: Callable[[], Any], rounds: int) -> list[float]:
    """Wall-clock seconds of ``fn()`` for each of ``rounds`` runs."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``samples``."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def fmt(value: float, digits: int = 3) -> str:
    """Compact human formatting for table cells."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{digits}g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.{digits}g}k"
    return f"{value:.{digits}g}"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""
    cells = [[str(c) for c in columns]]
    for row in rows:
        cells.append([
            fmt(row[c]) if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns
        ])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    if title:
        print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def bar(value: float, target: float, higher_is_better: bool = True) -> dict[str, Any]:
    """One entry of the ``bars`` object: value, target and whether it holds."""
    holds = value >= target if higher_is_better else value <= target
    return {"value": value, "target": target, "holds": bool(holds)}


def write_json(path: Path | None, name: str, rows: Sequence[dict[str, Any]],
               bars: dict[str, Any], **extra: Any) -> None:
    """Write the benchmark's results to ``path`` (no-op when ``path`` is None)."""
    if path is None:
        return
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
           "rows": list(rows), "bars": bars, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def print_bars(bars: dict[str, Any]) -> None:
    """Print each bar as 'name: value (target) holds/MISSED'."""
    print("\nbars")
    for name, b in bars.items():
        verdict = "holds" if b["holds"] else "MISSED"
        print(f"  {name}: {fmt(float(b['value']))} (target {fmt(float(b['target']))}) {verdict}")
