#!/usr/bin/env bash
# Set up .venv if needed, then run servekit's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/kv_cache_tour.py "$@"
