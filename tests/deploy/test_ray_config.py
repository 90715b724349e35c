"""``servekit ray-serve`` settings (no cluster): a bad one fails fast naming its key, from the
file, ``serve run``'s arguments or the command line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from servekit.server.config import ConfigError
from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")


@pytest.mark.parametrize(("toml", "key"), [
    ('[ray]\nrouting_policy = "no_such_policy"\n[engine]\nfake = true\n', "ray.routing_policy"),
    ("[ray]\nreplicas = 0\n[engine]\nfake = true\n", "ray.replicas"),
    ('[engine]\nmodel = "no-model-here"\n', "engine.model"),
    ('[engine]\npolicy = "no_such_policy"\n', "engine.policy"),
    ("[ray]\nreplica = 2\n", "ray.replica"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    from servekit.deploy.ray import build_app

    path = tmp_path / "servekit.toml"
    path.write_text(toml)
    (tmp_path / "no-model-here").mkdir()
    started = time.monotonic()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_app({"config": str(path)})
    assert time.monotonic() - started < 10  # before anything is deployed


def test_serve_run_arguments_are_read_by_type(tmp_path: Path) -> None:
    from servekit.deploy.ray.config import from_mapping

    args = from_mapping({"fake": "true", "replicas": "3", "replica_cpus": "0.25",
                         "routing_policy": "least_loaded"})
    assert (args.fake, args.replicas, args.replica_cpus) == (True, 3, 0.25)
    assert args.routing_policy == "least_loaded"
    with pytest.raises(ConfigError, match="replicas=two"):
        from_mapping({"fake": "true", "replicas": "two"})
    with pytest.raises(ConfigError, match="unknown setting 'replica'"):
        from_mapping({"replica": "2"})


def test_cli_rejects_bad_config_with_the_key(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from servekit.server.cli import main

    path = tmp_path / "servekit.toml"
    path.write_text("[ray]\nreplicas = 0\n[engine]\nfake = true\n")
    assert main(["ray-serve", "--config", str(path)]) == 2
    assert "ray.replicas: must be at least 1, got 0" in capsys.readouterr().err


def test_routing_policy_ray_keeps_rays_own_router(tmp_path: Path) -> None:
    from servekit.deploy.ray import build_app

    path = tmp_path / "servekit.toml"
    path.write_text('[engine]\nfake = true\n[ray]\nrouting_policy = "ray"\n')
    ingress = build_app({"config": str(path)})
    replica = ingress._bound_deployment.init_args[0]._bound_deployment
    assert replica._deployment_config.request_router_config.request_router_class.endswith(
        "PowerOfTwoChoicesRequestRouter")
    path.write_text("[engine]\nfake = true\n")
    replica = build_app({"config": str(path)})._bound_deployment.init_args[0]._bound_deployment
    assert replica._deployment_config.request_router_config.request_router_class.endswith(
        "ServekitRequestRouter")


def test_cli_takes_max_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from servekit.server.cli import main

    path = tmp_path / "servekit.toml"
    path.write_text("[ray]\nreplicas = 2\n[engine]\nfake = true\n")
    assert main(["ray-serve", "--config", str(path), "--max-replicas", "1"]) == 2
    assert "--max-replicas: autoscaling needs" in capsys.readouterr().err  # the flag named


def test_one_file_serves_serve_and_ray_serve(tmp_path: Path) -> None:
    """``servekit serve`` skips ``[ray]`` (ray-serve's table) and still checks its own keys;
    ``servekit ray-serve`` reads both from the same file and checks ``[ray]``."""
    from servekit.deploy.ray.config import ALL_SETTINGS
    from servekit.server.config import load_config

    path = tmp_path / "servekit.toml"
    path.write_text("[engine]\nmax_num_seqs = 8\n[ray]\nreplicas = 3\n")
    values = load_config(path)
    assert values["max_num_seqs"] == 8 and "replicas" not in values
    assert load_config(path, ALL_SETTINGS)["replicas"] == 3
    path.write_text("[engine]\nmax_num_seqs = 8\n[ray]\nreplica = 3\n")
    assert "replica" not in load_config(path)  # not serve's to check
    with pytest.raises(ConfigError, match=r"unknown key ray\.replica;"):
        load_config(path, ALL_SETTINGS)
    path.write_text("[engine]\nmax_num_seq = 8\n[ray]\nreplicas = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key engine\.max_num_seq;"):
        load_config(path)  # serve still checks its own tables
    path.write_text("ray = 3\n")
    with pytest.raises(ConfigError, match=r"\[ray\] must be a table"):
        load_config(path, ALL_SETTINGS)
    with pytest.raises(ConfigError, match=r"unknown section or key 'ray'"):
        load_config(path)
