"""``servekit serve``'s usage settings from flags and from the config file."""

from __future__ import annotations

from pathlib import Path

from servekit.server.cli import build_parser
from servekit.server.config import apply_config
from servekit.server.usage_cli import recorder_from_args


def test_config_file_usage_section(tmp_path: Path) -> None:
    (tmp_path / "servekit.toml").write_text(
        '[usage]\nsinks = ["sqlite://ledger.db"]\ndata_dir = "state"\nfail_open = true\n'
        "max_rows = 10\n")
    args = apply_config(build_parser().parse_args(
        ["serve", "--fake", "--config", str(tmp_path / "servekit.toml")]))
    recorder = recorder_from_args(args)
    assert recorder is not None
    assert recorder.urls == ["sqlite://ledger.db"]
    assert recorder.data_dir == tmp_path / "state"
    assert recorder.outbox.fail_open and recorder.outbox.max_rows == 10


def test_flags_override_and_none_turns_it_off(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    args = apply_config(parse(["serve", "--fake", "--data-dir", str(tmp_path),
                               "--usage", "sqlite://a.db", "--usage", "chdb://ch"]))
    recorder = recorder_from_args(args)
    assert recorder is not None and recorder.urls == ["sqlite://a.db", "chdb://ch"]
    assert recorder.outbox.sinks == ("sqlite://a.db", "chdb://ch")
    assert recorder_from_args(apply_config(parse(["serve", "--usage", "none"]))) is None
