"""An engine-like proxy over the replica deployment: the seam the reference server already has.

:class:`~servekit.server.service.GenerationService` needs of an engine only ``tokenizer``,
``model_name``, ``max_model_len``, ``generate`` (an async iterator of deltas) and ``abort``
(:class:`~servekit.server.service.EngineLike`). :class:`ReplicaEngine` gives it those over a
Ray Serve handle, so the ingress runs the server's own request handling unchanged. Each
``generate`` is one streaming call (``handle.options(stream=True)``), routed by the deployment's
request router; leaving it early, or ``abort``, cancels the call, which aborts the request on
its replica. Errors raised on the replica come back as themselves (a full queue is still a 503,
a bad token id a 400).

A replica that dies mid-request (its actor killed, its node gone) fails over: the proxy sends
the same request, plus the output token ids it has already yielded (``output_token_ids``, the
engine's resume), to another replica, which prefills prompt + those ids and streams only what
follows. The caller sees one uninterrupted stream: greedy and seeded generations continue as the
uninterrupted run would (a seeded draw depends only on ``(seed, position)``), and the counts of
the last delta cover every output token once. After ``max_failovers`` such failovers the request
fails with a 503 ``replica_failed``. :attr:`ReplicaEngine.failovers` counts the resumes by
reason (``actor_died``, ``actor_unavailable``, ``actor_error``: how Ray reported the loss); the
ingress shows them on ``/metrics``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from servekit.engine.outputs import RequestOutput
from servekit.protocol.errors import ServiceUnavailableError
from servekit.sched.params import SamplingParams

__all__ = ["ReplicaEngine", "failover_reason"]

#: retry-after of the 503 answered when a replica died or Ray refused the request
_RETRY_AFTER = 1.0
#: Failovers of one request to another replica after the one serving it died (the gateway's
#: bound too).
MAX_FAILOVERS = 3

logger = logging.getLogger("servekit.deploy")


class ReplicaEngine:
    """The engine contract over a replica deployment ``handle`` (``info``: the replica's
    :meth:`~servekit.deploy.ray.replica.EngineReplica.info`)."""

    coalesces_outputs = False  # the replicas coalesce before the Ray hop

    def __init__(self, handle: Any, info: Mapping[str, Any], *,
                 max_failovers: int = MAX_FAILOVERS) -> None:
        self._stream = handle.options(stream=True)
        self.max_failovers = max_failovers
        #: Requests resumed on another replica after theirs was lost, by reason
        #: (:func:`failover_reason`; one per failover).
        self.failovers: Counter[str] = Counter()
        self.tokenizer: Any = info["tokenizer"]
        self.model_name: str = info["model_name"]
        self.max_model_len: int = int(info["max_model_len"])
        #: requests one replica holds at once (None: unbounded); see admission_capacity
        self.admission_capacity: int | None = info.get("admission_capacity")
        self._live: dict[str, Any] = {}
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._prefix = f"ray-{os.getpid():x}-"

    @property
    def num_failovers(self) -> int:
        """Requests resumed on another replica, all reasons together."""
        return sum(self.failovers.values())

    @property
    def num_live_requests(self) -> int:
        """Streams open through this proxy."""
        return len(self._live)

    async def generate(self, prompt: str | list[int], params: SamplingParams, *,
                       request_id: str | None = None, tenant: str | None = None,
                       priority: int = 0, cache_salt: str | None = None,
                       deadline: float | None = None,
                       output_token_ids: Sequence[int] = ()) -> AsyncIterator[RequestOutput]:
        """The request's deltas, streamed from the replica the router picks
        (``output_token_ids`` resumes after them there); resumed on another replica when that
        one dies (see the module docstring).

        ``deadline`` (this process's monotonic clock) is not forwarded: clocks differ across
        nodes; the ingress's own timeouts and client disconnects abort instead."""
        rid = request_id if request_id is not None else f"{self._prefix}{next(self._ids)}"
        done = list(output_token_ids)  # output ids so far: what a failover resumes after
        failovers = 0
        try:
            while True:
                response = self._stream.generate.remote(
                    prompt, params, request_id=rid, tenant=tenant, priority=priority,
                    cache_salt=cache_salt, output_token_ids=done.copy())
                self._live[rid] = response
                finished = False
                try:
                    async for out in response:
                        finished = out.finished
                        done += out.new_token_ids
                        yield out
                    return
                except Exception as exc:
                    if finished and _replica_lost(exc):
                        return  # it died after the last delta: the request is complete
                    if (finished or failovers >= self.max_failovers or rid in self._aborted
                            or not _replica_lost(exc)):
                        raise _unwrap(exc) from None
                    failovers += 1
                    self.failovers[failover_reason(exc)] += 1
                    logger.warning("request %s: its replica failed (%s) after %d output "
                                   "tokens; resuming on another (failover %d of %d)", rid,
                                   type(exc).__name__, len(done), failovers, self.max_failovers)
                finally:
                    if not finished:
                        response.cancel()
        finally:
            self._live.pop(rid, None)
            self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        """Cancel ``request_id``'s call (its replica aborts it); no-op when it is done."""
        response = self._live.get(request_id)
        if response is not None:
            self._aborted.add(request_id)  # not to be resumed elsewhere
            response.cancel()


def _replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica serving the call is gone (not the request's fault)."""
    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        return isinstance(exc.cause, RayActorError)
    return isinstance(exc, RayActorError)  # ActorDiedError, ActorUnavailableError


def failover_reason(exc: BaseException) -> str:
    """How Ray reported a lost replica: ``actor_died`` (its actor is dead: killed, crashed,
    its node gone), ``actor_unavailable`` (unreachable for now, e.g. restarting) or
    ``actor_error`` (another :class:`~ray.exceptions.RayActorError`)."""
    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        exc = exc.cause
    if isinstance(exc, ActorDiedError):
        return "actor_died"
    if isinstance(exc, ActorUnavailableError):
        return "actor_unavailable"
    return "actor_error"


def _unwrap(exc: Exception) -> Exception:
    """The replica's own exception, or a 503 for a replica that is gone or refused."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, RayActorError):
            return cause
    if isinstance(exc, (RayActorError, ActorUnavailableError)):
        return ServiceUnavailableError(f"the replica serving this request failed "
                                       f"({type(exc).__name__}); retry",
                                       retry_after=_RETRY_AFTER, code="replica_failed")
    if isinstance(exc, BackPressureError):
        return ServiceUnavailableError("every replica is at max_ongoing_requests; retry later",
                                       retry_after=_RETRY_AFTER)
    return exc
