"""The protocol package and the client stand alone: no server, engine or torch behind them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", [
    "import servekit.client; servekit.client.Client; servekit.client.GrpcClient",
    "import servekit.protocol.schema, servekit.protocol.errors, servekit.protocol.sse",
    "from servekit.protocol.grpc_gen import servekit_pb2, servekit_pb2_grpc",
])
def test_importing_it_loads_no_server_engine_or_torch(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert "servekit.client" in loaded or "servekit.protocol" in loaded  # it did import
    bad = sorted(m for m in loaded
                 if m.split(".")[0] == "torch" or m.startswith(("servekit.server", "servekit.engine")))
    assert bad == []
