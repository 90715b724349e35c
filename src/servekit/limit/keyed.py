"""Per-key RPM/TPM limits on top of :class:`servekit.limit.Limiter`: reserve, then settle.

Used by the server (``servekit serve``) and the gateway's edge (``servekit gateway``): with a
shared store (Redis), every process gives a key exactly its limit in total.

Each API key carries its own limits, so keys are grouped by their ``(rpm, tpm)`` pair, one
:class:`~servekit.limit.Limiter` per distinct pair, all sharing one store. A request reserves
1 request and ``prompt + max_tokens`` tokens (OpenAI's accounting) under the bucket key
``<key id>:<model>`` (a hash of the API key, never the key itself); when it ends — finished,
failed, aborted or cancelled — the reservation is settled with the tokens really used.

When the store cannot decide (Redis down), the request is not told it is rate limited: it gets
a 503 ``rate_limit_store_unavailable`` with a backoff-worthy ``retry-after``, or, with
``fail_open=True``, it is admitted unlimited. Either way the outage is counted
(``rate_limit_store_errors``) and logged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from attrs import frozen

from servekit.limit.bucket import Limit
from servekit.limit.decision import Decision, Reservation
from servekit.limit.errors import RequestTooLargeError, StoreUnavailableError
from servekit.limit.headers import openai_headers
from servekit.limit.keys import ApiKey
from servekit.limit.limiter import Limiter
from servekit.limit.store import MemoryStore, Store
from servekit.metrics.events import RATE_LIMIT_STORE_ERRORS, ResourceGauge
from servekit.metrics.hooks import HookSet
from servekit.protocol.errors import ServiceUnavailableError, TooManyRequestsError

logger = logging.getLogger("servekit.limit")

__all__ = ["Admission", "KeyLimits"]


@frozen(slots=True)
class Admission:
    """A granted reservation (None when the key has no limits) and the headers to return."""

    reservation: Reservation | None
    limiter: Limiter | None
    headers: dict[str, str]


_UNLIMITED = Admission(None, None, {})


class KeyLimits:
    """Reserves and settles each key's RPM and TPM; ``open_reservations`` shows leaks."""

    def __init__(self, *, store: Store | None = None, clock: Callable[[], float] = time.monotonic,
                 hooks: HookSet | None = None, fail_open: bool = False,
                 outage_retry_after: float = 10.0) -> None:
        self._store: Store = MemoryStore() if store is None else store
        self.fail_open = fail_open
        self.outage_retry_after = outage_retry_after
        #: Decisions the store could not make (an outage), since start.
        self.store_errors = 0
        self._clock = clock
        self._hooks = hooks
        self._limiters: dict[tuple[int | None, int | None], Limiter] = {}
        self._ids: dict[str, str] = {}

    @property
    def open_reservations(self) -> int:
        """Reservations taken and not yet settled (nor expired), over all keys."""
        return sum(lim.open_reservations for lim in self._limiters.values())

    def reserve(self, key: ApiKey | None, model: str, tokens: int) -> Admission:
        """Reserve 1 request and ``tokens`` tokens, or raise 429 with OpenAI's headers."""
        if key is None or (key.rpm is None and key.tpm is None):
            return _UNLIMITED
        limiter, bucket, cost = self._request(key, model)
        with _too_large_as_429(key, model, tokens):
            decision = limiter.try_acquire(bucket, cost(tokens), reserve=True)
        return self._admission(key, model, limiter, decision)

    async def areserve(self, key: ApiKey | None, model: str, tokens: int) -> Admission:
        """Async :meth:`reserve`: a remote store's (Redis) round trip leaves the loop free."""
        if key is None or (key.rpm is None and key.tpm is None):
            return _UNLIMITED
        limiter, bucket, cost = self._request(key, model)
        with _too_large_as_429(key, model, tokens):
            decision = await limiter.atry_acquire(bucket, cost(tokens), reserve=True)
        return self._admission(key, model, limiter, decision)

    def _request(self, key: ApiKey, model: str
                 ) -> tuple[Limiter, str, Callable[[int], dict[str, float]]]:
        """The key's limiter, its bucket for ``model`` and the cost of a request of n tokens."""
        limiter = self._limiter(key.rpm, key.tpm)
        if key.tpm is None:
            return limiter, f"{self._key_id(key)}:{model}", lambda n: {"requests": 1.0}
        return limiter, f"{self._key_id(key)}:{model}", lambda n: {"requests": 1.0,
                                                                 "tokens": float(n)}

    def _admission(self, key: ApiKey, model: str, limiter: Limiter, decision: Decision
                   ) -> Admission:
        if decision.error is not None:
            return self._outage(model, decision.error)
        headers = openai_headers(decision, requests="requests" if key.rpm is not None else None)
        if not decision.allowed:
            kind = "tokens" if "tokens" in decision.denied_by else "requests"
            per = key.tpm if kind == "tokens" else key.rpm
            raise TooManyRequestsError(
                f"Rate limit reached for {model} on {kind} per minute: limit {per}; "
                f"retry after {headers.get('retry-after', '1')} s", headers=headers)
        return Admission(decision.reservation, limiter, headers)

    def _outage(self, model: str, error: str) -> Admission:
        self.store_errors += 1
        hooks = self._hooks
        if hooks is not None and hooks.wants.resource_gauge:
            hooks.on_resource_gauge(ResourceGauge(RATE_LIMIT_STORE_ERRORS,
                                                  float(self.store_errors), self._clock()))
        logger.warning("rate-limit store unavailable (%s): %s", "admitting" if self.fail_open
                       else "refusing", error)
        if self.fail_open:
            return _UNLIMITED
        raise ServiceUnavailableError(
            f"Rate limits for {model} cannot be checked right now (the limit store is "
            "unavailable); retry later", retry_after=self.outage_retry_after,
            code="rate_limit_store_unavailable")

    def settle(self, admission: Admission, used_tokens: int) -> None:
        """Settle a reservation with the tokens really used (prompt + completion)."""
        if admission.reservation is not None and admission.limiter is not None:
            with _settle_failure_logged():
                admission.limiter.settle(admission.reservation, _used(admission, used_tokens))

    async def asettle(self, admission: Admission, used_tokens: int) -> None:
        """Async :meth:`settle` (shielded: a cancelled request still settles)."""
        if admission.reservation is not None and admission.limiter is not None:
            with _settle_failure_logged():
                await admission.limiter.asettle(admission.reservation,
                                                _used(admission, used_tokens))

    def _limiter(self, rpm: int | None, tpm: int | None) -> Limiter:
        limiter = self._limiters.get((rpm, tpm))
        if limiter is None:
            # a key without an RPM still counts requests, against a limit it can never reach
            limits = [Limit.per_period("requests", rpm if rpm is not None else 1e12, 60.0)]
            if tpm is not None:
                limits.append(Limit.per_period("tokens", tpm, 60.0))
            limiter = Limiter(limits, store=self._store, clock=self._clock, hooks=self._hooks,
                              fail_open=self.fail_open)
            self._limiters[(rpm, tpm)] = limiter
        return limiter

    def _key_id(self, key: ApiKey) -> str:
        kid = self._ids.get(key.key)
        if kid is None:
            kid = self._ids[key.key] = hashlib.sha256(key.key.encode()).hexdigest()[:16]
        return kid


def _used(admission: Admission, used_tokens: int) -> dict[str, float]:
    assert admission.limiter is not None
    if "tokens" in admission.limiter.limits.names:
        return {"requests": 1.0, "tokens": float(used_tokens)}
    return {"requests": 1.0}


@contextmanager
def _too_large_as_429(key: ApiKey, model: str, tokens: int) -> Iterator[None]:
    try:
        yield
    except RequestTooLargeError:
        raise TooManyRequestsError(
            f"Request too large for {model}: {tokens} tokens requested, the limit is "
            f"{key.tpm} tokens per minute; reduce the prompt or max_tokens",
            headers={"x-should-retry": "false"}, code="request_too_large") from None


@contextmanager
def _settle_failure_logged() -> Iterator[None]:
    try:
        yield
    except StoreUnavailableError as exc:
        # The request is over: keep its whole reservation charged (the conservative side)
        # rather than turn its response into an error or mask the error it already has.
        logger.warning("could not settle a rate-limit reservation: %s", exc)
