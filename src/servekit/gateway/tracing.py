"""OpenTelemetry spans of the gateway: one per client request, one child per replica attempt.

``servekit[otel]``. The request's span (kind ``SERVER``, named ``POST /v1/chat/completions``)
runs from its arrival until its response ended (a stream's last byte); it carries the model,
whether it streamed, its status, how many attempts and failovers it took. Each attempt (kind
``CLIENT``, named ``attempt``) is its child: the replica, why it was sent (``first``,
``retry`` before the first byte, ``resume`` after it) and how it ended (the outcome of
``servekit_gateway_replica_responses_total``: ``200``, ``connect_error``, ``reset``,
``stream_ok``, ``stream_cut``, ...). The attempt's context goes to the replica in a W3C
``traceparent`` header, so a replica that traces joins the trace.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from servekit._optional import require
from servekit.gateway.wrapped import WrappedResponse

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["GatewayTracer", "RequestTrace", "TracedResponse"]

_OK_OUTCOMES = frozenset({"stream_ok", "stream_drained", "client_gone"})


class GatewayTracer:
    """Starts the spans of the gateway's requests on ``tracer_provider`` (default: the global
    one of the OpenTelemetry API)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        trace = require("opentelemetry.trace", "otel")
        self._propagate = require("opentelemetry.propagate", "otel")
        self._trace = trace
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer("servekit.gateway")

    def request(self, method: str, path: str, headers: Mapping[str, str]) -> RequestTrace:
        """The trace of one client request (its span started now; a child of the client's
        ``traceparent``, if it sent one)."""
        span = self._tracer.start_span(f"{method} {path}", kind=self._trace.SpanKind.SERVER,
                                       context=self._propagate.extract(headers),
                                       attributes={"http.request.method": method,
                                                   "url.path": path})
        return RequestTrace(self, span)


class RequestTrace:
    """One client request's span and its current attempt's."""

    __slots__ = ("_attempt", "_owner", "attempts", "failovers", "span")

    def __init__(self, owner: GatewayTracer, span: Span) -> None:
        self._owner, self.span = owner, span
        self._attempt: Span | None = None
        self.attempts = 0
        self.failovers = 0

    def describe(self, model: Any, stream: bool) -> None:
        """What the request asked for."""
        self.span.set_attribute("servekit.stream", stream)
        if isinstance(model, str) and model:
            self.span.set_attribute("gen_ai.request.model", model)

    def attempt(self, replica: str, why: str, headers: MutableMapping[str, str]) -> None:
        """An attempt on ``replica`` starts (``why``: first, retry, resume); its context is
        put in ``headers`` for the replica."""
        owner = self._owner
        self.end_attempt("abandoned")
        self.attempts += 1
        context = owner._trace.set_span_in_context(self.span)
        span = owner._tracer.start_span("attempt", context=context,
                                        kind=owner._trace.SpanKind.CLIENT,
                                        attributes={"servekit.replica": replica,
                                                    "servekit.attempt.reason": why,
                                                    "servekit.attempt.number": self.attempts})
        owner._propagate.inject(headers, context=owner._trace.set_span_in_context(span))
        self._attempt = span

    def failed_over(self) -> None:
        """The stream was cut after its first byte and is being resumed."""
        self.failovers += 1

    def end_attempt(self, outcome: str) -> None:
        """The current attempt ended with ``outcome``."""
        span, self._attempt = self._attempt, None
        if span is None:
            return
        span.set_attribute("servekit.outcome", outcome)
        if not (outcome in _OK_OUTCOMES or (outcome.isdigit() and int(outcome) < 400)):
            span.set_status(self._owner._trace.Status(self._owner._trace.StatusCode.ERROR,
                                                      outcome))
        span.end()

    def end(self, status: int | None, error: BaseException | None = None) -> None:
        """The request's response ended (``status``; ``error``: it failed on the way)."""
        self.end_attempt("abandoned")
        span = self.span
        span.set_attributes({"servekit.attempts": self.attempts,
                             "servekit.failovers": self.failovers})
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        trace = self._owner._trace
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        elif status is not None and status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
        span.end()


class TracedResponse(WrappedResponse):
    """``inner``, ending ``trace`` once it was sent (a stream: after its last byte)."""

    def __init__(self, inner: Response, trace: RequestTrace) -> None:
        super().__init__(inner)
        self.trace = trace

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        status: int | None = self.status_code

        async def sent(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, sent)
        except BaseException as exc:
            self.trace.end(status, exc)
            raise
        self.trace.end(status)
