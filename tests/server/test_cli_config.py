"""``servekit serve --config``: the file, flags over it, errors naming the file and key, and a
real server configured by file against a real redis-server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from servekit.server.cli import build_parser
from servekit.server.config import ConfigError, apply_config, load_config
from tests.limit.conftest import RedisServer
from tests.server.cli_server import cli_servers, run_clis

GOOD = """
hooks = ["stats", { name = "request_log", args = { model_name = "m" } }]

[server]
host = "127.0.0.1"
port = 9001
api_keys = "keys.json"
grace_period = 2.5
served_model_name = "shakespeare"

[engine]
max_num_seqs = 8
max_num_batched_tokens = 512
kv_cache_mb = 16
block_size = 8
enable_prefix_caching = false
policy = { name = "priority", args = { aging_rate = 0.5 } }
victim_policy = "lowest_priority"

[limits]
store = "redis://127.0.0.1:1/0"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "servekit.toml"
    path.write_text(text)
    return path


def parse(*argv: str) -> object:
    return apply_config(build_parser().parse_args(["serve", *argv]))


def test_the_file_holds_what_the_flags_hold(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    values = load_config(path)
    assert values["policy"] == 'priority:{"aging_rate": 0.5}'
    assert values["hook"] == ["stats", 'request_log:{"model_name": "m"}']
    assert values["api_keys"] == tmp_path / "keys.json"  # relative to the file
    assert values["served_model_name"] == ["shakespeare"]
    assert values["enable_prefix_caching"] is False and values["block_size"] == 8
    args = parse("--config", str(path))
    assert (args.port, args.grace_period, args.max_num_seqs, args.limiter_store) == (  # type: ignore[attr-defined]
        9001, 2.5, 8, "redis://127.0.0.1:1/0")
    assert args.device == "cpu" and args.max_waiting_requests == 1024  # type: ignore[attr-defined]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    args = parse("--config", str(path), "--port", "9002", "--policy", "fair",
                 "--hook", "stats", "--enable-prefix-caching", "--limiter-store", "memory://")
    assert args.port == 9002 and args.policy == "fair"  # type: ignore[attr-defined]
    assert args.hook == ["stats"] and args.enable_prefix_caching is True  # type: ignore[attr-defined]
    assert args.limiter_store == "memory://" and args.max_num_seqs == 8  # type: ignore[attr-defined]
    defaults = parse()
    assert (defaults.port, defaults.policy, defaults.hook) == (8000, "fcfs", [])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "message"), [
    ("[engine]\nmax_num_seqs = \"many\"", r"servekit\.toml: engine\.max_num_seqs must be an integer, got 'many'"),
    ("[engine]\nenable_prefix_caching = 1", r"engine\.enable_prefix_caching must be true or false"),
    ("[engine]\nmax_num_seq = 4", r"unknown key engine\.max_num_seq; \[engine\] takes .*max_num_seqs"),
    ("[database]\nurl = 1", r"unknown section or key 'database'"),
    ("[engine]\npolicy = { name = 3 }", r"engine\.policy must be a plugin name"),
    ("[engine]\npolicy = 'fair:[1]'", r"engine\.policy: .*'fair' must be a JSON object"),
    ("hooks = [{ nam = 'stats' }]", r"hooks\[0\] must be a plugin name"),
    ("[server]\nport = 80.5", r"server\.port must be an integer"),
    ("[server\nport = 1", r"servekit\.toml: not valid TOML"),
])
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


BAD_PLUGINS = [
    ("[engine]\npolicy = 'lifo'", (), r"servekit\.toml: engine\.policy: no policy plugin named 'lifo'"),
    ("[engine]\npolicy = 'priority:{\"aging_rate\": -1}'", (),
     r"engine\.policy: policy plugin 'priority' \(servekit\) rejected .*aging_rate"),
    ("hooks = ['nope']", (), r"servekit\.toml: hooks: no hook plugin named 'nope'"),
    ("[limits]\nstore = 'etcd://x'", (), r"limits\.store: no limiter_store plugin named 'etcd'"),
    ("", ("--policy", "fair:{\"weights\": 3}"), r"--policy: policy plugin 'fair'"),
    ("", ("--hook", "stats:{\"x\": 1}"), r"--hook: hook plugin 'stats' \(servekit\) rejected"),
]
BAD_ENGINE_SIZES = [
    ("[engine]\nblock_size = 0", (), r"servekit\.toml: engine\.block_size: block_size: must be"),
    ("", ("--max-num-seqs", "0"), r"^servekit serve: --max-num-seqs: max_num_seqs: must be"),
    ("[engine]\nkv_cache_mb = 0", (), r"engine\.kv_cache_mb: kv_cache_bytes: must be"),
]


@pytest.fixture(scope="module")
def bad_serves(tmp_path_factory: pytest.TempPathFactory
               ) -> dict[tuple[str, tuple[str, ...]], subprocess.CompletedProcess[str]]:
    """``servekit serve`` run to its exit on each bad file or flags of BAD_PLUGINS and
    BAD_ENGINE_SIZES, all at once: each process imports torch before it fails."""
    cases = [(text, flags) for text, flags, _ in BAD_PLUGINS + BAD_ENGINE_SIZES]
    argvs = [["serve", "--config", str(write(tmp_path_factory.mktemp("bad"), text)), *flags,
              "--port", "1"] for text, flags in cases]
    return dict(zip(cases, run_clis(*argvs, timeout=120), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("text", "flags", "message"), BAD_PLUGINS)
def test_bad_plugins_fail_before_the_server_starts(
        bad_serves: dict[tuple[str, tuple[str, ...]], subprocess.CompletedProcess[str]],
        text: str, flags: tuple[str, ...], message: str) -> None:
    done = bad_serves[text, flags]
    assert done.returncode == 2
    assert done.stderr.startswith("servekit serve: ")
    assert re.search(message, done.stderr), done.stderr


@pytest.mark.slow
def test_serve_configured_by_file_with_redis_limits(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text(json.dumps(
        {"keys": [{"key": "sk-bob", "tenant": "bob", "rpm": 1}]}))
    redis = RedisServer()
    try:
        path = write(tmp_path, f"""
hooks = [{{ name = "request_log", args = {{ model_name = "from-config" }} }}]

[server]
api_keys = "keys.json"
log_level = "info"

[engine]
max_num_seqs = 4
kv_cache_mb = 8
enable_prefix_caching = false
policy = {{ name = "priority", args = {{ aging_rate = 0.5 }} }}

[limits]
store = "{redis.url}"
""")
        # both processes start at once (their imports overlap); the second is queried only
        # after the first's requests
        with cli_servers(["--config", str(path), "--policy", "fair"],
                         ["--config", str(path)]) as (server, fresh):
            out = server.wait_for_output("scheduling policy: fair")  # the flag wins
            assert "servekit.sched.policy.FairSharePolicy" in out
            auth = {"authorization": "Bearer sk-bob"}
            body = {"model": "servekit-demo", "prompt": "JULIET:", "max_tokens": 3}
            ok = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
            assert ok.status_code == 200, ok.text
            server.wait_for_output('"model":"from-config"')  # the hook from the file logs
            limited = httpx.post(server.url + "/v1/completions", json=body, headers=auth,
                                 timeout=60)
            assert limited.status_code == 429 and "retry-after" in limited.headers
            assert httpx.post(server.url + "/v1/completions", json=body,
                              timeout=60).status_code == 401  # the keys file is in force
            server.proc.kill()
            fresh.wait_for_output("servekit.sched.policy.PriorityPolicy")  # the file's policy
            # the limit lives in Redis, so another server process still sees bob's request
            assert httpx.post(fresh.url + "/v1/completions", json=body, headers=auth,
                              timeout=60).status_code == 429
    finally:
        redis.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("text", "flags", "message"), BAD_ENGINE_SIZES)
def test_bad_engine_sizes_name_their_origin(
        bad_serves: dict[tuple[str, tuple[str, ...]], subprocess.CompletedProcess[str]],
        text: str, flags: tuple[str, ...], message: str) -> None:
    done = bad_serves[text, flags]
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr


def test_the_engine_process_settings_come_from_the_file_or_the_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nprocess = true\n\n[server]\napi_processes = 3\n")
    args = parse("--config", str(path))
    assert args.engine_process is True and args.api_processes == 3  # type: ignore[attr-defined]
    args = parse("--config", str(path), "--api-processes", "2")
    assert args.api_processes == 2  # type: ignore[attr-defined]
    args = parse()
    assert args.engine_process is False and args.api_processes == 1  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"server\.api_processes must be an integer"):
        load_config(write(tmp_path, '[server]\napi_processes = "two"\n'))


def test_the_guided_backend_comes_from_the_file_or_the_flags(tmp_path: Path) -> None:
    from servekit.server.cli import engine_config

    path = write(tmp_path, '[engine]\nguided_backend = "llguidance"\nguided_fallback_after = 5\n')
    config = engine_config(parse("--config", str(path)))
    assert (config.guided_backend, config.guided_fallback_after) == ("llguidance", 5.0)
    config = engine_config(parse("--guided-fallback-after", "0"))  # 0: never fall back
    assert (config.guided_backend, config.guided_fallback_after) == ("xgrammar", None)
    bad = write(tmp_path, '[engine]\nguided_backend = "outlines"\n')
    with pytest.raises(ConfigError, match=r"servekit\.toml: engine\.guided_backend: "):
        engine_config(parse("--config", str(bad)))
