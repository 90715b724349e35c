"""``servekit gateway``: the command line of the gateway."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from servekit._optional import require


def add_gateway_parser(sub: Any) -> None:
    """Add the ``gateway`` subcommand to the ``servekit`` parser's subparsers."""
    gw = sub.add_parser("gateway", help="front several replicas: cache-aware routing, retries")
    gw.add_argument("--replica", action="append", required=True, metavar="URL",
                    help="base URL of a replica, e.g. http://10.0.0.5:8000 (repeatable)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument("--policy", default="cache_aware", metavar="NAME[:JSON]",
                    help="routing policy: cache_aware (default), least_loaded, power_of_two, "
                         "consistent_hash, round_robin, or a plugin's name")
    gw.add_argument("--probe-interval", type=float, default=0.5,
                    help="seconds between readiness probes / KV-event polls of each replica")
    gw.add_argument("--log-level", default="info")


def run_gateway(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM / Ctrl-C. The replicas' shared secret comes from
    ``$SERVEKIT_GATEWAY_SECRET`` (never a flag: it would show in the process list)."""
    uvicorn = require("uvicorn", "gateway")
    from servekit.gateway.app import create_gateway

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_gateway(args.replica, policy=args.policy,
                         secret=os.environ.get("SERVEKIT_GATEWAY_SECRET") or None,
                         probe_interval=args.probe_interval)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, lifespan="on")
    return 0
