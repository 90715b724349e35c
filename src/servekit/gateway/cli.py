"""``servekit gateway``: the command line of the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from servekit._optional import require


def add_gateway_parser(sub: Any) -> None:
    """Add the ``gateway`` subcommand to the ``servekit`` parser's subparsers."""
    gw = sub.add_parser("gateway", help="front several replicas: cache-aware routing, retries")
    gw.add_argument("--replica", action="append", default=[], metavar="URL",
                    help="base URL of a replica, e.g. http://10.0.0.5:8000 (repeatable)")
    gw.add_argument("--replicas-file", type=Path, default=None, metavar="FILE",
                    help="more replicas, one base URL per line (# comments); re-read every "
                         "--probe-interval: edits add and remove replicas at run time")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument("--policy", default="cache_aware", metavar="NAME[:JSON]",
                    help="routing policy: cache_aware (default), least_loaded, power_of_two, "
                         "consistent_hash, round_robin, or a plugin's name")
    gw.add_argument("--probe-interval", type=float, default=0.5,
                    help="seconds between readiness probes / KV-event polls of each replica")
    gw.add_argument("--slow-start", type=float, default=0.0, metavar="SECONDS",
                    help="ramp a replica that comes back (breaker closed, ready again) from a "
                         "tenth of its weight to all of it over this many seconds (default 0: "
                         "off)")
    gw.add_argument("--failure-threshold", type=int, default=3, metavar="N",
                    help="consecutive failed requests that open a replica's circuit breaker "
                         "(default 3)")
    gw.add_argument("--cooldown", type=float, default=2.0, metavar="SECONDS",
                    help="seconds an open breaker waits before one probe request is let "
                         "through (half-open; default 2)")
    gw.add_argument("--otel", action="store_true",
                    help="an OpenTelemetry span per request, a child per replica attempt, on "
                         "the global tracer provider (configure it with the OpenTelemetry SDK, "
                         "e.g. opentelemetry-instrument; extra otel)")
    gw.add_argument("--api-keys", type=Path, default=None,
                    help="JSON file of keys, as servekit serve's (default: $SERVEKIT_API_KEYS, "
                         "else open)")
    gw.add_argument("--limiter-store", default=None, metavar="URL",
                    help="where rate-limit state lives: memory:// (default), "
                         "redis://host:port/db (shared by every gateway), or a plugin's scheme")
    gw.add_argument("--rate-limit-fail-open", action="store_true",
                    help="with the limiter store down, admit unlimited (default: 503)")
    gw.add_argument("--rate-limit-outage-retry-after", type=float, default=10.0,
                    help="retry-after seconds of the 503 sent while the store is down")
    from servekit.usage.cli import add_usage_flags

    add_usage_flags(gw)  # the gateway writes each client request's ledger record
    gw.add_argument("--log-level", default="info")


def run_gateway(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM / Ctrl-C. The replicas' shared secret comes from
    ``$SERVEKIT_GATEWAY_SECRET`` (never a flag: it would show in the process list)."""
    uvicorn = require("uvicorn", "gateway")
    from servekit.gateway.app import create_gateway
    from servekit.gateway.fleet import read_replicas_file
    from servekit.gateway.tracing import GatewayTracer

    if not args.replica and args.replicas_file is None:
        print("servekit gateway: give --replica URL (repeatable) or --replicas-file FILE",
              file=sys.stderr)
        return 2
    if args.replicas_file is not None:
        try:
            read_replicas_file(args.replicas_file)
        except (OSError, ValueError) as exc:
            print(f"servekit gateway: --replicas-file: {exc}", file=sys.stderr)
            return 2

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from servekit.limit import KeyLimits, KeyStore
    from servekit.limit.store import MemoryStore, store_from_url

    keys = KeyStore.from_file(args.api_keys) if args.api_keys else KeyStore.from_env()
    store = MemoryStore() if args.limiter_store is None else store_from_url(args.limiter_store)
    limits = KeyLimits(store=store, fail_open=args.rate_limit_fail_open,
                       outage_retry_after=args.rate_limit_outage_retry_after)
    from servekit.usage.cli import recorder_from_args

    # its own outbox file: a gateway may share a data directory (and its sqlite:// sink) with
    # a replica on the same host
    usage = recorder_from_args(args, outbox="gateway-usage-outbox.db")
    app = create_gateway(args.replica, policy=args.policy,
                         secret=os.environ.get("SERVEKIT_GATEWAY_SECRET") or None,
                         probe_interval=args.probe_interval, keys=keys, limits=limits,
                         slow_start=args.slow_start, replicas_file=args.replicas_file,
                         failure_threshold=args.failure_threshold, cooldown=args.cooldown,
                         tracer=GatewayTracer() if args.otel else None,
                         usage=usage)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, lifespan="on")
    return 0
