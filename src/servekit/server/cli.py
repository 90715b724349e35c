"""``servekit serve``: the reference OpenAI-compatible server on one engine.

    servekit serve                          # the bundled demo model on 127.0.0.1:8000
    servekit serve --model ./my-llama --port 9000 --api-keys keys.json

With no ``--model`` it serves the tiny Shakespeare Llama shipped in ``servekit/demo_model``.
SIGTERM or Ctrl-C drains: ``/ready`` turns false and new requests get 503 + retry-after while
in-flight requests get ``--grace-period`` seconds to finish; the rest end with an error event,
then the listener closes (a second signal exits at once).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from servekit._optional import require
from servekit.metrics.hooks import HookSet
from servekit.server.keys import KeyStore

__all__ = ["DEMO_MODEL", "build_parser", "main"]

logger = logging.getLogger("servekit.server")

#: Seconds uvicorn waits for connections to close after the drain (responses are done by then).
_CLOSE_TIMEOUT = 5
#: Largest request head (request line and headers), bytes.
_MAX_HEADER_BYTES = 64 * 2**10

#: The bundled demo model directory (a tiny Llama trained on Tiny Shakespeare).
DEMO_MODEL = Path(str(files("servekit") / "demo_model"))


def build_parser() -> argparse.ArgumentParser:
    """The ``servekit`` command line."""
    parser = argparse.ArgumentParser(prog="servekit", description="servekit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    serve.add_argument("--model", type=Path, default=None,
                       help="local Hugging Face model directory (default: the bundled demo model)")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="name(s) clients use for the model (default: the directory name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=None,
                       help="also serve gRPC (servekit.v1.Generation, health, reflection) on this port")
    serve.add_argument("--api-keys", type=Path, default=None,
                       help="JSON file of keys (default: $SERVEKIT_API_KEYS, else open)")
    serve.add_argument("--grace-period", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on shutdown")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=128)
    serve.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="bound of the waiting queue (over it: 503 + retry-after)")
    serve.add_argument("--kv-cache-mb", type=int, default=256)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--fake", action="store_true",
                       help="serve an instant fake model (benchmarks, smoke tests)")
    serve.add_argument("--fake-token-delay", type=float, default=0.0,
                       help="seconds between the fake model's tokens")
    # -- hardening: body, stream and connection limits (docs/server.md) --
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body, bytes (413 above; default: one prompt of "
                            "the model's longest context, at least 1 MiB)")
    serve.add_argument("--send-timeout", type=float, default=30.0,
                       help="seconds a stream waits on a client that stopped reading before "
                            "it is aborted")
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection has to send its request head")
    serve.add_argument("--rate-limit-fail-open", action="store_true",
                       help="admit requests unlimited while the rate-limit store is down "
                            "(default: 503 rate_limit_store_unavailable)")
    serve.add_argument("--rate-limit-outage-retry-after", type=float, default=10.0,
                       help="retry-after seconds of the 503 sent while the rate-limit store is down")
    serve.add_argument("--metrics-style", choices=("prometheus", "vllm"), default="prometheus",
                       help="/metrics names: Prometheus conventions under servekit_ (default), "
                            "or vLLM's exact vllm: names for dashboards built for vLLM")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true")
    return parser


def build_engine(args: argparse.Namespace, hooks: Any = None) -> Any:
    """The engine the arguments ask for (the fake engine, or the real one on a model)."""
    if args.fake:
        from servekit.server.fake import FakeEngine

        return FakeEngine(model_name=(args.served_model_name or ["fake"])[0],
                          token_delay=args.fake_token_delay,
                          max_waiting=args.max_waiting_requests)
    from servekit.engine import AsyncEngine, EngineConfig, LLMEngine

    path = args.model or DEMO_MODEL
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_waiting_requests=args.max_waiting_requests, kv_cache_bytes=args.kv_cache_mb * 2**20,
        device=args.device, dtype=args.dtype)
    return AsyncEngine(LLMEngine(str(path), config=config, hooks=hooks))


def _model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return str(args.served_model_name[0])
    if args.model is None:
        return "servekit-demo"
    return Path(args.model).resolve().name


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / Ctrl-C; returns the exit status."""
    require("uvicorn", "server")
    import uvicorn

    from servekit.server.app import ServerConfig, create_app
    from servekit.server.runner import DrainingServer, header_timeout_protocol

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = KeyStore.from_file(args.api_keys) if args.api_keys else KeyStore.from_env()
    if args.model is not None and not args.fake and not Path(args.model).is_dir():
        print(f"servekit serve: --model {str(args.model)!r} is not a directory", file=sys.stderr)
        return 2
    names = tuple(args.served_model_name) if args.served_model_name else (
        ("fake",) if args.fake else (_model_name(args),))
    config = ServerConfig(model_names=names, grace_period=args.grace_period,
                          max_body_bytes=args.max_body_bytes, send_timeout=args.send_timeout,
                          rate_limit_fail_open=args.rate_limit_fail_open,
                          rate_limit_outage_retry_after=args.rate_limit_outage_retry_after,
                          metrics_style=args.metrics_style)
    hooks = HookSet()
    metrics = _metrics(names[0], args.metrics_style)
    if metrics is not None:
        hooks.add(metrics)
    # the engine is built in a worker thread at startup: /health answers while the model loads
    app = create_app(lambda: build_engine(args, hooks), keys=keys, hooks=hooks,
                     metrics=metrics if metrics is not None else False, config=config)
    state = app.state.servekit.state
    # the server drains before uvicorn shuts down, so uvicorn's own shutdown finds the
    # responses complete; its timeout only bounds closing what is left
    server = DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.access_log, timeout_graceful_shutdown=_CLOSE_TIMEOUT,
        timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=_MAX_HEADER_BYTES, lifespan="on",
        http=header_timeout_protocol(args.header_timeout)),
        state, args.grace_period)
    logger.info("servekit serving %s on http://%s:%d/v1 (%s)", ", ".join(names), args.host,
                args.port, "open: no API keys" if keys.open else f"{len(keys)} API key(s)")
    if args.grpc_port is None:
        server.run()
    else:  # gRPC beside HTTP: one engine, one GenerationService, one drain
        import asyncio

        from servekit.server.grpc.server import serve_beside

        asyncio.run(serve_beside(server, app.state.servekit, host=args.host,
                                 port=args.grpc_port, grace_period=args.grace_period))
    return 1 if state.error else 0


def _metrics(model_name: str, style: str = "prometheus") -> Any:
    try:
        from servekit.metrics.prometheus import PrometheusHook

        return PrometheusHook(model_name, style=style)  # type: ignore[arg-type]
    except ImportError:
        logger.warning("prometheus_client is not installed: /metrics is off")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``servekit`` script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
