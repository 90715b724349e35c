#!/usr/bin/env bash
# Create .venv (if missing) and install servekit with everything its tests and benchmarks use.
# torch==2.13.0 goes in first: it is the CPU wheel, and a plain `torch` requirement with no torch
# installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.servekit-installed
# re-install when pyproject.toml (dependencies, entry points) changes
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
  fi
  .venv/bin/pip install --quiet -e '.[dev,bench]'
  touch "$stamp"
fi
# the example plugin package (examples/plugin_package), which the test suite serves with
.venv/bin/python -c 'import servekit_example_plugins' 2>/dev/null || .venv/bin/pip install --quiet --no-deps -e examples/plugin_package
