"""Run every benchmark script one after the other and summarise their bars.

    python benchmarks/run_all.py --quick [--out DIR] [--only kv,router]

Each ``bench_<part>.py`` runs in its own process (so one part's imports and threads do not
disturb the next) with ``--json DIR/<part>.json``; the summary lists every bar and whether it
holds. ``bench_grpc`` is left out: ``bench_server`` runs its rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"grpc"}  # measured inside bench_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON files go")
    parser.add_argument("--only", default="", help="comma-separated parts, e.g. kv,router")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="servekit-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    only = {p for p in args.only.split(",") if p}
    parts = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    failed = []
    summary: list[tuple[str, str, object, object, object]] = []
    for part in parts:
        if part in SKIP or (only and part not in only):
            continue
        path = out / f"{part}.json"
        cmd = [sys.executable, str(HERE / f"bench_{part}.py"), "--json", str(path)]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== bench_{part} ===", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(part)
            continue
        if path.exists():  # bench_attention writes nothing without a GPU
            for name, b in json.loads(path.read_text()).get("bars", {}).items():
                summary.append((part, name, b.get("value"), b.get("target"), b.get("holds")))
    print("\n=== bars ===")
    for part, name, value, target, holds in summary:
        verdict = "holds" if holds is True else "MISSED" if holds is False else "not measured"
        print(f"{part:>10}  {name}: {value} (target {target}) {verdict}")
    print(f"\nJSON in {out}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
