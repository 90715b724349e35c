"""The example plugin package (examples/plugin_package), installed into the test environment by
scripts/setup.sh and .ci/run, is found through its entry points and really used by the server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.limit.conftest import RedisServer
from tests.server.cli_server import cli_server, run_clis

PLUGINS = {("policy", "deadline"), ("hook", "tenant_tokens"), ("routing_policy", "cache_affinity")}


@pytest.mark.slow
def test_plugins_list_shows_the_example_package() -> None:
    # both listings at once: each process imports the server before it prints
    listed, table = run_clis(["plugins", "list", "--json"], ["plugins", "list", "--kind", "policy"])
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    ours = {(r["kind"], r["name"]): r for r in rows
            if r["distribution"] == "servekit-example-plugins"}
    assert set(ours) == PLUGINS, "pip install -e examples/plugin_package (scripts/setup.sh does)"
    assert all(r["version"] == "0.1.0" and r["api_version"] == 1 for r in ours.values())
    assert ours["policy", "deadline"]["target"] == "servekit_example_plugins.deadline:DeadlinePolicy"
    builtin = {(r["kind"], r["name"]) for r in rows if r["distribution"] == "servekit"}
    assert {("policy", "fcfs"), ("limiter_store", "redis"), ("hook", "prometheus")} <= builtin
    assert "deadline" in table.stdout and "servekit-example-plugins 0.1.0" in table.stdout
    assert "prometheus" not in table.stdout


@pytest.mark.slow
def test_serve_with_the_deadline_policy_the_tenant_hook_and_redis_limits(
        tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-acme", "tenant": "acme", "rpm": 2}]}))
    redis = RedisServer()
    try:
        with cli_server("--policy", 'deadline:{"default_slack": 5.0}',
                        "--hook", 'tenant_tokens:{"log_every": 1}',
                        "--limiter-store", redis.url, "--api-keys", str(keys),
                        "--log-level", "info") as server:
            server.wait_for_output("scheduling policy: deadline")
            assert ("(servekit_example_plugins.deadline.DeadlinePolicy)" in server.output())
            auth = {"authorization": "Bearer sk-acme"}
            body = {"model": "servekit-demo", "prompt": "ROMEO:", "max_tokens": 4,
                    "temperature": 0}
            first = httpx.post(server.url + "/v1/completions", json=body, headers=auth,
                               timeout=60)
            assert first.status_code == 200, first.text
            usage = first.json()["usage"]
            assert usage["completion_tokens"] == 4
            server.wait_for_output(
                f"tenant_tokens tenant=acme requests=1 prompt_tokens={usage['prompt_tokens']} "
                "output_tokens=4")
            assert httpx.post(server.url + "/v1/completions", json=body, headers=auth,
                              timeout=60).status_code == 200
            third = httpx.post(server.url + "/v1/completions", json=body, headers=auth,
                               timeout=60)
            assert third.status_code == 429  # rpm 2, counted in Redis
            import redis as redis_py

            client = redis_py.Redis.from_url(redis.url)
            assert any(k.startswith(b"servekit:rl:") for k in client.keys("*"))
            client.close()
    finally:
        redis.stop()
