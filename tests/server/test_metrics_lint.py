"""/metrics of a live server passes ``promtool check metrics``; vLLM's names by configuration."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from servekit.server import ApiKey, FakeEngine, KeyStore, create_app
from servekit.server.app import ServerConfig
from tests.server.conftest import serve


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing under CI (apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    return path


def _scrape_after_traffic(style: str) -> str:
    keys = KeyStore([ApiKey("sk-a", tenant="a", rpm=1000, tpm=100_000)])
    app = create_app(FakeEngine(max_model_len=256), keys=keys,
                     config=ServerConfig(metrics_style=style))
    with serve(app) as server:
        for stream in (False, True):
            r = httpx.post(server.url + "/v1/completions", headers={"authorization": "Bearer sk-a"},
                           json={"model": "fake", "prompt": "x", "max_tokens": 3,
                                 "stream": stream})
            assert r.status_code == 200
        metrics = httpx.get(server.url + "/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        return metrics.text


def test_live_metrics_pass_promtool() -> None:
    promtool = _promtool()
    text = _scrape_after_traffic("prometheus")
    assert "servekit_rate_limit_decisions_total{" in text and ":" not in text.split("{")[0]
    assert "# TYPE servekit_iteration_tokens histogram" in text
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_vllm_names_by_configuration() -> None:
    text = _scrape_after_traffic("vllm")
    assert "# TYPE vllm:iteration_tokens_total histogram" in text
    assert "vllm:generation_tokens_total{" in text and "servekit_" not in text


def test_the_cli_picks_the_metrics_style() -> None:
    from servekit.server.cli import _metrics, build_parser

    args = build_parser().parse_args(["serve", "--metrics-style", "vllm"])
    assert _metrics("m", args.metrics_style).prefix == "vllm:"
    assert _metrics("m").prefix == "servekit_"
