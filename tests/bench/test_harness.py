"""``python -m servekit.bench``: each part runs on tiny sizes and reports rows and a ratio."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from servekit.bench.__main__ import main
from servekit.plugins import UnknownPluginError

CASES = {
    "scheduler": ["--policy", "fair", "--running", "4"],  # every scenario, 4 running
    "limiter": ["--store", "memory://?max_keys=50000", "--checks", "200"],
    "router": ["--routing-policy", "least_loaded", "--keys", "200", "--replicas", "4"],
    "hooks": ["--hook", "request_log"],
}


@pytest.mark.parametrize("part", sorted(CASES))
def test_part_writes_rows_and_ratios(part: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    assert main([part, *CASES[part], "--quick", "--rounds", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == f"servekit.bench {part}"
    assert {"cpu_count", "python"} <= set(doc["machine"])
    impls = {row["impl"] for row in doc["rows"]}
    assert len(impls) == 2 and any(i.startswith("plugin: ") for i in impls)
    assert all({"metric", "median", "min", "max"} <= set(row) for row in doc["rows"])
    assert doc["ratios"] and all(math.isfinite(v) and v > 0 for v in doc["ratios"].values())
    printed = capsys.readouterr().out
    assert "ratio (plugin speed / baseline speed" in printed
    for name in doc["ratios"]:
        assert f"  {name}: " in printed


def test_unknown_plugin_is_named() -> None:
    with pytest.raises(UnknownPluginError, match="no_such_policy"):
        main(["scheduler", "--policy", "no_such_policy", "--quick"])


def test_plugin_argument_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["router", "--quick"])
    assert "--routing-policy" in capsys.readouterr().err
