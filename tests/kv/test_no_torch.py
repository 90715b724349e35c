"""servekit.kv and servekit.sched are torch-free: the KV tensors live in servekit.engine."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["servekit.kv", "servekit.sched"])
def test_importing_does_not_import_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'servekit.engine')\n"
        "               if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert run.stdout.strip() == "", f"{module} imported {run.stdout.strip()}"
