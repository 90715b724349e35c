"""A custom OpenAI-compatible server assembled from servekit's parts, in under 100 lines.

    python examples/custom_server.py --model src/servekit/demo_model --port 8001

What it shows: your own engine settings, your own API keys and limits (a shared store could be
Redis: ``servekit.limit.redis``), your own metrics hook beside the Prometheus exporter, and the
app mounted under your own routes — the parts `servekit serve` is made of, used directly.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import FastAPI

from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
from servekit.metrics.events import RequestFinished
from servekit.metrics.hooks import Hook, HookSet
from servekit.metrics.prometheus import PrometheusHook
from servekit.server import ApiKey, KeyLimits, KeyStore, create_app
from servekit.server.app import ServerConfig

log = logging.getLogger("custom-server")


class SlowRequestLog(Hook):
    """A hook of our own: log every request that took longer than a threshold."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s

    def on_request_finished(self, event: RequestFinished) -> None:
        took = event.time - event.arrival_time
        if took > self.threshold_s:
            log.warning("slow request %s (tenant %s): %.2f s, %d tokens, %s", event.request_id,
                        event.tenant, took, event.output_tokens, event.reason)


def build(model: str) -> FastAPI:
    hooks = HookSet([SlowRequestLog(threshold_s=2.0)])
    prometheus = PrometheusHook("shakespeare", prefix="myco:")
    hooks.add(prometheus)

    # the engine: a small KV cache and batch, prefix caching on (per-key salts isolate tenants)
    engine = AsyncEngine(LLMEngine(model, hooks=hooks, config=EngineConfig(
        num_blocks=512, max_num_seqs=32, max_waiting_requests=64)))

    # two tenants: a free tier with tight limits and a paid tier sharing one cache salt
    keys = KeyStore([
        ApiKey("sk-free", tenant="free", rpm=10, tpm=2_000),
        ApiKey("sk-paid-1", tenant="paid", rpm=600, tpm=200_000, cache_salt="paid"),
        ApiKey("sk-paid-2", tenant="paid", rpm=600, tpm=200_000, cache_salt="paid"),
    ])
    api = create_app(engine, keys=keys, limits=KeyLimits(hooks=hooks), hooks=hooks,
                     metrics=prometheus,
                     config=ServerConfig(model_names=("shakespeare",), grace_period=10.0))

    @api.get("/version")
    async def version() -> dict[str, str]:
        return {"server": "custom-server 1.0", "model": "shakespeare"}

    return api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="src/servekit/demo_model")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    logging.basicConfig(level="INFO")
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port,
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
