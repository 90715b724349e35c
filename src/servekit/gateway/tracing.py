"""OpenTelemetry spans at the gateway: one per client request, one child per replica attempt.

The request span (kind SERVER, ``POST /v1/completions``) lasts until the response's last byte;
each attempt on a replica is a child (kind CLIENT, ``attempt``) carrying the replica, the
attempt's number, the output tokens it resumed after (a failover) and how it ended (the outcome
the ``replica_responses`` counter counts). The attempt's context goes to the replica in a W3C
``traceparent`` header, so a replica that traces joins the same trace.

Off unless the gateway gets a tracer provider (``create_gateway(tracer_provider=...)``, or
``servekit gateway --otel`` for the global one the OpenTelemetry SDK configures); needs
``servekit[otel]``.
"""

from __future__ import annotations

from typing import Any

from servekit._optional import require

__all__ = ["GatewayTracer"]


class GatewayTracer:
    """Starts and ends the gateway's request and attempt spans on ``tracer_provider``."""

    def __init__(self, tracer_provider: Any) -> None:
        self._trace = require("opentelemetry.trace", "otel")
        self._propagate = require("opentelemetry.propagate", "otel")
        self._tracer = tracer_provider.get_tracer("servekit.gateway")
        self._error = self._trace.Status(self._trace.StatusCode.ERROR)

    def request(self, method: str, path: str) -> Any:
        """A started span for one client request."""
        return self._tracer.start_span(
            f"{method} {path}", kind=self._trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path})

    def end_request(self, span: Any, status: int, *, failed: bool = False) -> None:
        """End a request span with the status the client got (``failed``: the stream ended
        with an error event after a 200)."""
        span.set_attribute("http.response.status_code", status)
        if failed or status >= 500:
            span.set_status(self._error)
        span.end()

    def attempt(self, parent: Any, replica: str, number: int, resumed_tokens: int,
                headers: dict[str, str]) -> Any:
        """A started child span of ``parent`` for attempt ``number`` (1-based) on ``replica``;
        its context is written into ``headers`` (``traceparent``) for the replica."""
        context = self._trace.set_span_in_context(parent)
        span = self._tracer.start_span(
            "attempt", context=context, kind=self._trace.SpanKind.CLIENT,
            attributes={"server.address": replica, "servekit.attempt": number,
                        "servekit.resumed_tokens": resumed_tokens})
        self._propagate.inject(headers, context=self._trace.set_span_in_context(span))
        return span

    def end_attempt(self, span: Any, outcome: str) -> None:
        """End an attempt span with its outcome (``stream_ok``, ``stream_cut``, ``reset``,
        ``connect_error``, an HTTP status, ...)."""
        span.set_attribute("servekit.outcome", outcome)
        if outcome not in ("stream_ok", "client_gone") and not outcome.startswith(("2", "4")):
            span.set_status(self._error)
        span.end()
