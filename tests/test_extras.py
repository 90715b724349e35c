"""Optional dependencies: each part names the extra that installs what it misses, and the core
(plus the protocol and what a gateway needs) imports without torch.

Each case runs in a fresh interpreter whose import system refuses the "missing" modules, as
if their distribution were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")


def _run(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("blocked", "statement", "extra"), [
    (("torch",), "import servekit.engine", "engine"),
    pytest.param(*(("transformers",), "from servekit.engine import LLMEngine", "engine"), marks=pytest.mark.slow),
    pytest.param(*(("torch",), "import servekit.ops", "engine"), marks=pytest.mark.slow),
    pytest.param(*(("triton",), "import servekit.ops.triton", "engine"), marks=pytest.mark.slow),
    pytest.param(*(("torch",), "import servekit.server", "engine"), marks=pytest.mark.slow),
    pytest.param(*(("fastapi",), "import servekit.server", "server"), marks=pytest.mark.slow),
    pytest.param(*(("grpc",), "import servekit.server.grpc.server", "grpc"), marks=pytest.mark.slow),
    pytest.param(*(("grpc",), "import servekit.client.grpc", "grpc"), marks=pytest.mark.slow),
    (("httpx",), "import servekit.client", "client"),
    (("redis",), "from servekit.limit.redis import RedisStore; RedisStore('redis://127.0.0.1:1')",
     "redis"),
    (("prometheus_client",), "from servekit.metrics import PrometheusHook; PrometheusHook('m')",
     "prometheus"),
    (("opentelemetry",), "from servekit.metrics import OtelHook; OtelHook('m')", "otel"),
    (("ray",), "import servekit.deploy.ray", "ray"),
])
def test_a_missing_extra_is_named(blocked: tuple[str, ...], statement: str, extra: str) -> None:
    result = _run(blocked, f"""
        from servekit.errors import MissingExtraError
        try:
            {statement}
        except MissingExtraError as exc:
            print("MISSING:", exc)
        else:
            print("IMPORTED")
    """)
    assert result.returncode == 0, result.stderr
    assert f"servekit[{extra}]" in result.stdout, result.stdout


def test_the_core_the_protocol_and_a_gateways_parts_need_no_torch() -> None:
    result = _run(("torch", "transformers", "triton", "tokenizers", "fastapi", "uvicorn"), """
        import servekit
        import servekit.kv, servekit.sched, servekit.limit, servekit.route, servekit.metrics
        import servekit.protocol.schema, servekit.protocol.errors, servekit.protocol.sse
        import servekit.client
        from servekit import HashRing, Limiter, Scheduler, HookSet
        print("OK", servekit.__version__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")


def test_the_version_comes_from_the_package_metadata() -> None:
    import importlib.metadata

    import servekit

    assert servekit.__version__ == importlib.metadata.version("servekit")


@pytest.mark.slow
def test_ray_serve_without_ray_names_the_extra() -> None:
    result = _run(("ray",), """
        import sys
        from servekit.server.cli import main
        sys.exit(main(["ray-serve", "--fake"]))
    """)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "servekit[ray]" in result.stderr
