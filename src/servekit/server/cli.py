"""``servekit serve``: the reference OpenAI-compatible server on one engine.

    servekit serve                          # the bundled demo model on 127.0.0.1:8000
    servekit serve --model ./my-llama --port 9000 --api-keys keys.json
    servekit serve --config servekit.toml --policy 'fair:{"weights": {"gold": 2}}' \
        --hook request_log --limiter-store redis://127.0.0.1:6379/0
    servekit plugins list                   # every installed plugin, by kind

With no ``--model`` it serves the tiny Shakespeare Llama shipped in ``servekit/demo_model``.
SIGTERM or Ctrl-C drains: ``/ready`` turns false and new requests get 503 + retry-after while
in-flight requests get ``--grace-period`` seconds to finish; the rest end with an error event,
then the listener closes (a second signal exits at once).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any

import attrs

from servekit import plugins
from servekit._optional import require
from servekit.limit.keyed import KeyLimits
from servekit.limit.keys import KeyStore
from servekit.metrics.hooks import HookSet
from servekit.server.config import (
    ConfigError,
    apply_config,
    build_checked,
    default,
    origin_of,
)

__all__ = ["DEMO_MODEL", "ServerParts", "build_core_client", "build_engine", "build_local_engine",
           "build_parser", "build_plugins", "core_factory", "front_end_tokenizer", "main",
           "served_names", "server_parts"]

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
    # Settings that the configuration file also holds default to None here, so a given flag
    # can override the file; servekit.server.config.SETTINGS has their real defaults.
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML file of settings (see docs/plugins.md); flags override it")
    serve.add_argument("--model", type=Path, default=None,
                       help="local Hugging Face model directory (default: the bundled demo model)")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="name(s) clients use for the model (default: the directory name)")
    serve.add_argument("--host", default=None, help=f"default: {default('host')}")
    serve.add_argument("--port", type=int, default=None, help=f"default: {default('port')}")
    serve.add_argument("--grpc-port", type=int, default=None,
                       help="also serve gRPC (servekit.v1.Generation, health, reflection) on this port")
    serve.add_argument("--api-keys", type=Path, default=None,
                       help="JSON file of keys (default: $SERVEKIT_API_KEYS, else open)")
    serve.add_argument("--grace-period", type=float, default=None,
                       help="seconds in-flight requests get to finish on shutdown "
                            f"(default: {default('grace_period')})")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=None,
                       help=f"default: {default('max_num_seqs')}")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="bound of the waiting queue (over it: 503 + retry-after; "
                            f"default: {default('max_waiting_requests')})")
    serve.add_argument("--kv-cache-mb", type=int, default=None,
                       help=f"default: {default('kv_cache_mb')}")
    serve.add_argument("--device", default=None, help=f"default: {default('device')}")
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--fake", action="store_true", default=None,
                       help="serve an instant fake model (benchmarks, smoke tests)")
    serve.add_argument("--engine-process", action="store_true", default=None,
                       help="run the engine core (scheduler, model, sampler, detokenizer) in a "
                            "process of its own, fed over ZMQ; tokenizing, HTTP and limits "
                            "stay in this one (needs servekit[engine-process]; docs/server.md)")
    serve.add_argument("--api-processes", type=int, default=None,
                       help="front-end processes sharing one engine core (implies "
                            "--engine-process; each binds the port with SO_REUSEPORT; "
                            f"default: {default('api_processes')})")
    serve.add_argument("--engine-address", default=None, help=argparse.SUPPRESS)  # a worker's
    serve.add_argument("--fake-token-delay", type=float, default=None,
                       help="seconds between the fake model's tokens")
    serve.add_argument("--fake-tokens-per-yield", type=int, default=None,
                       help="tokens the fake model makes per pass of the event loop (default 1: "
                            "one wake-up per token, as a stepping engine; docs/server.md)")
    serve.add_argument("--fake-model-cost", default=None, metavar="JSON",
                       help="serve the real engine (scheduler, KV cache, prefix cache, KV "
                            "events) over a fake model whose steps sleep a cost model, e.g. "
                            '\'{"base_s": 0.002, "prefill_token_s": 2e-5, "decode_row_s": 1e-4, '
                            '"num_blocks": 512}\' (servekit.engine.cost_runner)')
    # -- hardening: body, stream and connection limits (docs/server.md) --------------------------
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body, bytes (413 above; default: one prompt of "
                            "the model's longest context, at least 1 MiB)")
    serve.add_argument("--send-timeout", type=float, default=None,
                       help="seconds a stream waits on a client that stopped reading before "
                            f"it is aborted (default: {default('send_timeout')})")
    serve.add_argument("--timeout-keep-alive", type=float, default=None,
                       help="seconds an idle keep-alive connection stays open "
                            f"(default: {default('timeout_keep_alive')})")
    serve.add_argument("--header-timeout", type=float, default=None,
                       help="seconds a connection has to send its request head "
                            f"(default: {default('header_timeout')})")
    serve.add_argument("--rate-limit-fail-open", action="store_true", default=None,
                       help="admit requests unlimited while the rate-limit store is down "
                            "(default: 503 rate_limit_store_unavailable)")
    serve.add_argument("--rate-limit-outage-retry-after", type=float, default=None,
                       help="retry-after seconds of the 503 sent while the rate-limit store is "
                            f"down (default: {default('rate_limit_outage_retry_after')})")
    serve.add_argument("--metrics-style", choices=("prometheus", "vllm"), default=None,
                       help="/metrics names: Prometheus conventions under servekit_ (default), "
                            "or vLLM's exact vllm: names for dashboards built for vLLM")
    serve.add_argument("--log-level", default=None, help=f"default: {default('log_level')}")
    serve.add_argument("--access-log", action="store_true", default=None)
    # -- plugins and engine sizes (servekit.server.config) ------------------------------------
    serve.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help=f"token budget of one step (default: "
                            f"{default('max_num_batched_tokens')})")
    serve.add_argument("--block-size", type=int, default=None,
                       help=f"KV block size in tokens (default: {default('block_size')})")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=None, help="reuse the KV of shared prompt prefixes (default: on)")
    serve.add_argument("--policy", default=None, metavar="NAME[:JSON]",
                       help="scheduling policy: fcfs, priority, fair or a plugin's name; the "
                            "JSON object becomes its keyword arguments (default: fcfs)")
    serve.add_argument("--victim-policy", default=None, metavar="NAME[:JSON]",
                       help="preemption-victim policy (default: the scheduling policy's order)")
    serve.add_argument("--guided-backend", choices=("xgrammar", "llguidance"), default=None,
                       help="constrained-decoding backend (default: xgrammar)")
    serve.add_argument("--guided-fallback-after", type=float, default=None, metavar="SECONDS",
                       help="serve a constraint xgrammar is still compiling after this long "
                       "with llguidance (default: 2; 0: never)")
    serve.add_argument("--runner", default=None, metavar="NAME[:JSON]",
                       help="model-runner plugin that loads --model (default: transformers)")
    serve.add_argument("--hook", action="append", default=None, metavar="NAME[:JSON]",
                       help="add a metrics hook plugin (repeatable)")
    serve.add_argument("--limiter-store", default=None, metavar="URL",
                       help="where rate-limit state lives: memory:// (default), "
                            "redis://host:port/db, or a limiter_store plugin's scheme")
    # usage ledger ------------------------------------------------------------------------------
    from servekit.server.usage_cli import add_report_command, add_serve_flags

    add_serve_flags(serve)
    add_report_command(sub)
    # -------------------------------------------------------------------------------------------
    _gateway_cli().add_gateway_parser(sub)
    _deploy_cli().add_ray_parser(sub)
    listing = sub.add_parser("plugins", help="installed plugins")
    listing_sub = listing.add_subparsers(dest="plugins_command", required=True)
    show = listing_sub.add_parser("list", help="every installed plugin by kind")
    show.add_argument("--kind", choices=sorted(plugins.KINDS), default=None)
    show.add_argument("--json", action="store_true", help="one JSON object per plugin")
    return parser


def build_engine(args: argparse.Namespace, hooks: Any = None) -> Any:
    """The engine the arguments ask for (the fake engine, or the real one on a model), in this
    process or, with ``--engine-process``, in an engine-core process of its own."""
    if getattr(args, "engine_process", False) or getattr(args, "engine_address", None):
        return build_core_client(args, hooks)
    return build_local_engine(args, hooks)


def build_core_client(args: argparse.Namespace, hooks: Any = None) -> Any:
    """An :class:`~servekit.engine.core_client.EngineCoreClient` that starts the engine the
    arguments describe in its own process; the tokenizer is loaded here, in the front end."""
    from servekit.engine.core_client import EngineCoreClient

    tokenizer = front_end_tokenizer(args)
    if getattr(args, "engine_address", None):  # one of several front ends on a shared core
        return EngineCoreClient(address=args.engine_address, tokenizer=tokenizer, hooks=hooks,
                                core_timeout=5.0)
    return EngineCoreClient(core_factory(args), tokenizer=tokenizer, hooks=hooks,
                            log_level=args.log_level)


def core_factory(args: argparse.Namespace) -> Any:
    """What the engine-core process calls (with its hooks) to build the engine: picklable."""
    local = argparse.Namespace(**{**vars(args), "engine_process": False, "engine_address": None,
                                  "api_processes": 1})
    # by its importable name (pickled for the core), also when this module runs as __main__
    build = importlib.import_module("servekit.server.cli").build_local_engine
    return partial(build, local)


def front_end_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer of the engine the arguments describe, loaded in this process."""
    if args.fake:
        from servekit.server.fake import FakeTokenizer

        return FakeTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(args.model or DEMO_MODEL))


def build_local_engine(args: argparse.Namespace, hooks: Any = None) -> Any:
    """The engine the arguments describe, built in this process."""
    if args.fake:
        from servekit.server.fake import FakeEngine

        return FakeEngine(model_name=(args.served_model_name or ["fake"])[0],
                          token_delay=args.fake_token_delay,
                          tokens_per_yield=args.fake_tokens_per_yield,
                          max_waiting=args.max_waiting_requests)
    from servekit.engine import AsyncEngine, LLMEngine

    config = engine_config(args)
    if args.fake_model_cost is not None:
        engine = build_checked(args, "fake_model_cost", lambda: _cost_model_engine(
            args.fake_model_cost, config, hooks))
    else:
        path = args.model or DEMO_MODEL
        engine = build_checked(args, "runner",
                               lambda: LLMEngine(str(path), config=config, hooks=hooks))
    policy = engine.scheduler.policy
    logger.info("scheduling policy: %s (%s.%s)", args.policy, type(policy).__module__,
                type(policy).__qualname__)
    return AsyncEngine(engine)


def _cost_model_runner(spec: str, config: Any) -> Any:
    """:class:`~servekit.engine.cost_runner.CostModelRunner` with the keyword arguments of the
    JSON object ``spec`` (KV sized from the engine settings unless ``spec`` names
    ``num_blocks``)."""
    from servekit.engine.cost_runner import CostModelRunner

    try:
        kwargs = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc}): {spec!r}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"must be a JSON object, got {spec!r}")
    try:
        return CostModelRunner(**{"block_size": config.block_size,
                                  "kv_cache_bytes": config.kv_cache_bytes, **kwargs})
    except TypeError as exc:  # an unknown key
        raise ConfigError(str(exc)) from None


def _cost_model_engine(spec: str, config: Any, hooks: Any) -> Any:
    """The real engine over the cost-model runner and the fake engine's byte-level tokenizer."""
    from servekit.engine import LLMEngine
    from servekit.server.fake import FakeTokenizer

    return LLMEngine(_cost_model_runner(spec, config), config=config,
                     tokenizer=FakeTokenizer(), hooks=hooks)


#: EngineConfig fields that come from a setting of another name
_ENGINE_FIELD_SETTINGS = {"kv_cache_bytes": "kv_cache_mb"}


def engine_config(args: argparse.Namespace) -> Any:
    """The :class:`~servekit.engine.EngineConfig` the settings describe; a bad value raises
    :class:`ConfigError` naming the flag or the file and key it came from."""
    from servekit.engine import EngineConfig
    from servekit.sched.params import InvalidParameterError

    try:
        return EngineConfig(
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            max_waiting_requests=args.max_waiting_requests,
            kv_cache_bytes=args.kv_cache_mb * 2**20,
            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching, device=args.device,
            dtype=args.dtype, policy=args.policy, victim_policy=args.victim_policy,
            runner=args.runner, guided_backend=args.guided_backend,
            guided_fallback_after=args.guided_fallback_after or None)
    except InvalidParameterError as exc:
        dest = _ENGINE_FIELD_SETTINGS.get(exc.param, exc.param)
        raise ConfigError(f"{origin_of(args, dest)}: {exc}") from exc


def _model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return str(args.served_model_name[0])
    if args.model is None:
        return "servekit-demo"
    return Path(args.model).resolve().name


def serve(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run the server until SIGTERM / Ctrl-C; returns the exit status (``argv``: the command's
    own arguments, which ``--api-processes`` front ends are started with)."""
    require("uvicorn", "server")
    if args.api_processes < 1:
        raise ConfigError(f"{origin_of(args, 'api_processes')}: must be at least 1")
    if args.api_processes > 1 and args.engine_address is None:
        if args.grpc_port is not None:
            raise ConfigError(f"{origin_of(args, 'api_processes')}: gRPC (--grpc-port) is "
                              "served by a single front end; drop one of them")
        from servekit.server.multi import serve_many

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return serve_many(args, argv, core_factory(args))
    import uvicorn

    from servekit.server.app import create_app
    from servekit.server.runner import DrainingServer, header_timeout_protocol

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parts = server_parts(args)
    if args.model is not None and not args.fake and not Path(args.model).is_dir():
        print(f"servekit serve: --model {str(args.model)!r} is not a directory", file=sys.stderr)
        return 2
    keys, hooks, metrics, limits, config = (parts.keys, parts.hooks, parts.metrics, parts.limits,
                                            parts.config)
    names = config.model_names
    # the engine is built in a worker thread at startup: /health answers while the model loads
    from servekit.server.usage_cli import recorder_from_args

    app = create_app(lambda: build_engine(args, hooks), keys=keys, hooks=hooks, limits=limits,
                     metrics=metrics if metrics is not None else False, config=config,
                     usage=recorder_from_args(args))
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
    if args.engine_address is not None:  # one of --api-processes front ends: share the port
        from servekit.server.multi import reuse_port_socket

        server.run(sockets=[reuse_port_socket(args.host, args.port)])
    elif args.grpc_port is None:
        server.run()
    else:  # gRPC beside HTTP: one engine, one GenerationService, one drain
        import asyncio

        from servekit.server.grpc.server import serve_beside

        asyncio.run(serve_beside(server, app.state.servekit, host=args.host,
                                 port=args.grpc_port, grace_period=args.grace_period))
    return 1 if state.error else 0


@attrs.frozen
class ServerParts:
    """What :func:`~servekit.server.app.create_app` takes besides the engine, built from the
    settings as ``servekit serve`` builds them (``servekit ray-serve``'s ingress reuses it)."""

    keys: KeyStore
    hooks: HookSet
    metrics: Any  #: the PrometheusHook (also in ``hooks``), or None without prometheus_client
    limits: KeyLimits
    config: Any  #: the :class:`~servekit.server.app.ServerConfig`


def served_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The model names clients use: ``--served-model-name``, else ``fake`` or the model's."""
    if args.served_model_name:
        return tuple(args.served_model_name)
    fake = args.fake or getattr(args, "fake_model_cost", None) is not None
    return ("fake",) if fake else (_model_name(args),)


def server_parts(args: argparse.Namespace) -> ServerParts:
    """Keys, hooks (plugins + metrics), limits and the server config the settings describe;
    a bad plugin raises :class:`ConfigError` naming its flag or key."""
    from servekit.server.app import ServerConfig

    keys = KeyStore.from_file(args.api_keys) if args.api_keys else KeyStore.from_env()
    plugged = build_plugins(args)
    names = served_names(args)
    config = ServerConfig(model_names=names, grace_period=args.grace_period,
                          max_body_bytes=args.max_body_bytes, send_timeout=args.send_timeout,
                          rate_limit_fail_open=args.rate_limit_fail_open,
                          rate_limit_outage_retry_after=args.rate_limit_outage_retry_after,
                          metrics_style=args.metrics_style,
                          gateway_secret=os.environ.get("SERVEKIT_GATEWAY_SECRET") or None,
                          freeze_startup_heap=True)  # this process is the server
    hooks = HookSet(plugged.hooks)
    metrics = _metrics(names[0], args.metrics_style)
    if metrics is not None:
        hooks.add(metrics)
    limits = KeyLimits(store=plugged.store, hooks=hooks, fail_open=config.rate_limit_fail_open,
                       outage_retry_after=config.rate_limit_outage_retry_after)
    return ServerParts(keys, hooks, metrics, limits, config)


@attrs.frozen
class Plugged:
    """The plugins ``servekit serve`` builds before it starts: hooks and the limiter store."""

    hooks: tuple[Any, ...]
    store: Any


def build_plugins(args: argparse.Namespace) -> Plugged:
    """Build the hooks and the limiter store, and check the policies resolve, before the
    server starts: a bad plugin fails fast with the flag or config key that named it."""
    from servekit.limit.store import MemoryStore, store_from_url
    from servekit.sched.policy import make_policy, make_victim_policy

    hooks = tuple(build_checked(args, "hook", partial(plugins.resolve, "hook", spec))
                  for spec in args.hook)
    store = MemoryStore() if args.limiter_store is None else build_checked(
        args, "limiter_store", lambda: store_from_url(args.limiter_store))
    if not args.fake:  # the engine builds its own from the spec; this only checks it early
        config = engine_config(args)
        if args.fake_model_cost is not None:
            build_checked(args, "fake_model_cost",
                          lambda: _cost_model_runner(args.fake_model_cost, config))
        build_checked(args, "policy", lambda: make_policy(args.policy))
        if args.victim_policy is not None:
            build_checked(args, "victim_policy", lambda: make_victim_policy(args.victim_policy))
    return Plugged(hooks, store)


def list_plugins(kind: str | None = None, as_json: bool = False) -> str:
    """``servekit plugins list``: every installed plugin by kind, with its interface version
    and the distribution (and version) it comes from."""
    specs = plugins.available(kind)
    if as_json:
        return "\n".join(json.dumps({
            "kind": s.kind, "name": s.name, "api_version": plugins.KINDS[s.kind].api_version,
            "distribution": s.source, "version": s.version, "target": s.target,
        }) for s in specs)
    rows = [("KIND", "NAME", "API", "DISTRIBUTION", "TARGET")] + [
        (s.kind, s.name, str(plugins.KINDS[s.kind].api_version), f"{s.source} {s.version}",
         s.target) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[4]])
                     for r in rows)


def _metrics(model_name: str, style: str = "prometheus") -> Any:
    try:
        from servekit.metrics.prometheus import PrometheusHook

        return PrometheusHook(model_name, style=style)  # type: ignore[arg-type]
    except ImportError:
        logger.warning("prometheus_client is not installed: /metrics is off")
        return None


def _gateway_cli() -> Any:
    """The gateway's command-line module. The gateway is the server's sibling layer (neither
    imports the other); the one ``servekit`` command reaches it by name, as it reaches plugins."""
    import importlib

    return importlib.import_module("servekit.gateway.cli")


def _deploy_cli() -> Any:
    """``servekit ray-serve``'s module (servekit.deploy sits above the server: reached by name)."""
    return importlib.import_module("servekit.deploy.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``servekit`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sim"], ["plan"]):  # servekit.sim is a sibling layer: loaded by name
        return int(importlib.import_module("servekit.sim.cli").main(argv))
    args = build_parser().parse_args(argv)
    if args.command == "plugins":
        print(list_plugins(args.kind, args.json))
        return 0
    if args.command == "gateway":
        return int(_gateway_cli().run_gateway(args))
    if args.command == "ray-serve":
        return int(_deploy_cli().run_ray_serve(args))
    if args.command == "usage":
        from servekit.server.usage_cli import report

        print(report(args))
        return 0
    if args.command == "serve":
        try:
            return serve(apply_config(args), argv)
        except ConfigError as exc:
            print(f"servekit serve: {exc}", file=sys.stderr)
            return 2
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
