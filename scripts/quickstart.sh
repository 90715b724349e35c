#!/usr/bin/env bash
# Set up .venv if needed, then start the reference server on the demo model (arguments go to
# `servekit serve`, e.g. --port 9000 or --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/servekit serve "$@"
