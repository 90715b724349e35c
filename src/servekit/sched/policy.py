"""Scheduling policies: who is admitted next, who is preempted first.

A policy owns the waiting queue and ranks the running requests. The scheduler keeps its running
requests sorted by :meth:`SchedulingPolicy.running_rank`, schedules them in that order, and
takes preemption victims from the highest rank. Three policies ship:

* :class:`FCFSPolicy`: arrival order; the victim is the request admitted last.
* :class:`PriorityPolicy`: lower ``priority`` first, with linear aging so a low-priority request
  is never starved; a waiting request may preempt a running one it outranks.
* :class:`FairSharePolicy`: weighted fair share of scheduled tokens between tenants (virtual token
  counters), so a tenant that floods the queue gets no more than its share while others wait.

A plugin policy subclasses :class:`SchedulingPolicy` and implements the queue methods (interface
version 1, see :mod:`servekit.plugins`). The preemption victim is a separate, smaller extension
point, :class:`VictimPolicy`: by default the scheduling policy's own ``running_rank`` decides.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from itertools import count
from typing import Any, ClassVar, Protocol, runtime_checkable

from servekit import plugins
from servekit.sched.params import InvalidParameterError
from servekit.sched.request import Request


class SchedulingPolicy(ABC):
    """The protocol between the scheduler and a policy.

    The waiting queue: :meth:`push` (a new request), :meth:`push_preempted` (a preempted request,
    which should come back before requests that arrived after it), :meth:`peek`, :meth:`pop`,
    :meth:`remove` (an abort), ``len()`` and iteration (in admission order).

    The running order: :meth:`running_rank` gives each admitted request a sort key; the scheduler
    keeps its running requests sorted by it, schedules them in that order and preempts the
    highest rank first. When ``preempts_for_waiting`` is true the scheduler asks
    :meth:`outranks` whether the head of the waiting queue may preempt the last running request
    when it cannot otherwise be admitted. When ``charges_tokens`` is true the scheduler reports
    every step's scheduled tokens to :meth:`charge`.
    """

    #: the interface version this class implements (see :mod:`servekit.plugins`)
    api_version: ClassVar[int] = 1
    name: str = "policy"
    preempts_for_waiting: bool = False
    charges_tokens: bool = False

    @abstractmethod
    def push(self, request: Request) -> None:
        """Enqueue a newly added request."""

    @abstractmethod
    def push_preempted(self, request: Request) -> None:
        """Re-enqueue a preempted request (ahead of requests that arrived after it)."""

    @abstractmethod
    def peek(self) -> Request | None:
        """The request to admit next, or None when the queue is empty."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the request :meth:`peek` returns."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Remove a queued request (it was aborted or expired)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of queued requests."""

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """The queued requests (order unspecified for heap-based policies)."""

    def running_rank(self, request: Request, admission: int) -> Any:
        """The running-order key of an admitted request (default: admission order).

        ``admission`` counts admissions, so the default makes the request admitted last the
        first preemption victim.
        """
        return admission

    def outranks(self, waiting: Request, running: Request) -> bool:
        """True when ``waiting`` may preempt ``running`` to be admitted."""
        return False

    def charge(  # noqa: B027 - optional hook, a no-op unless the policy accounts tokens
        self, requests: Sequence[Request], num_new_tokens: Sequence[int]
    ) -> None:
        """Account one step's scheduled tokens (called only when ``charges_tokens``)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; a preempted request goes back to the front of the queue."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self._queue.append(request)

    def push_preempted(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` first, then arrival order, with aging.

    A request's effective priority is ``priority - aging_rate * (now - arrival_time)``: it gains
    ``aging_rate`` priority levels per second of the scheduler's clock, so with a positive rate
    every request is eventually served. Because aging is linear and shared, the order is the
    time-independent key ``priority + aging_rate * arrival_time``, kept in a heap. The running
    list is sorted by the same key, so the victim is the running request with the worst key, and
    a waiting request that outranks it may preempt it.
    """

    name = "priority"
    preempts_for_waiting = True

    def __init__(self, aging_rate: float = 0.1) -> None:
        if not (isinstance(aging_rate, (int, float)) and aging_rate >= 0):
            raise InvalidParameterError("aging_rate", f"must be a number >= 0, got {aging_rate!r}")
        self.aging_rate = float(aging_rate)
        self._heap: list[tuple[float, float, int, Request]] = []
        self._serial = count()

    def _key(self, request: Request) -> tuple[float, float, int]:
        key = request.policy_key
        if key is None:
            key = (
                request.priority + self.aging_rate * request.arrival_time,
                request.arrival_time,
                next(self._serial),
            )
            request.policy_key = key
        return key  # type: ignore[return-value]

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (*self._key(request), request))

    def push_preempted(self, request: Request) -> None:
        self.push(request)  # its key is unchanged, so it returns to its place in line

    def peek(self) -> Request | None:
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id!r} is not queued")

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))

    def running_rank(self, request: Request, admission: int) -> Any:
        return self._key(request)

    def outranks(self, waiting: Request, running: Request) -> bool:
        return self._key(waiting) < self._key(running)


class FairSharePolicy(SchedulingPolicy):
    """Weighted fair share of tokens between tenants (virtual token counters).

    Each tenant has a counter of the tokens scheduled for it (prompt and generated), divided by
    its weight. The next request admitted belongs to the waiting tenant with the lowest counter;
    within a tenant, first come first served. A tenant whose queue was empty is lifted to the
    lowest counter among the waiting tenants when it returns, so idle time banks no credit. This
    is the virtual token counter scheme of Sheng et al., "Fairness in Serving Large Language
    Models" (OSDI 2024). Requests without a tenant share the tenant ``None``.
    """

    name = "fair"
    charges_tokens = True

    def __init__(self, weights: Mapping[str | None, float] | None = None,
                 default_weight: float = 1.0) -> None:
        if not default_weight > 0:
            raise InvalidParameterError("default_weight", f"must be > 0, got {default_weight!r}")
        if weights is not None and not isinstance(weights, Mapping):
            raise InvalidParameterError("weights", f"must be a mapping of tenant to weight, got {weights!r}")
        self._inverse: dict[str | None, float] = {}
        for tenant, weight in (weights or {}).items():
            if not (isinstance(weight, (int, float)) and weight > 0):
                raise InvalidParameterError("weights", f"weight of {tenant!r} must be > 0, got {weight!r}")
            self._inverse[tenant] = 1.0 / weight
        self._default_inverse = 1.0 / default_weight
        self.counters: dict[str | None, float] = {}
        self._queues: dict[str | None, deque[Request]] = {}
        self._size = 0
        self._floor = 0.0  # counter of the last tenant whose queue emptied

    def _lift(self, tenant: str | None) -> None:
        if self._queues:
            floor = min(self.counters.get(t, 0.0) for t in self._queues)
        else:
            floor = self._floor
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def _queue_for(self, tenant: str | None) -> deque[Request]:
        queue = self._queues.get(tenant)
        if queue is None:
            self._lift(tenant)
            queue = self._queues[tenant] = deque()
        return queue

    def push(self, request: Request) -> None:
        self._queue_for(request.tenant).append(request)
        self._size += 1

    def push_preempted(self, request: Request) -> None:
        self._queue_for(request.tenant).appendleft(request)
        self._size += 1

    def _head_tenant(self) -> str | None:
        counters = self.counters
        return min(self._queues, key=lambda t: counters[t])

    def peek(self) -> Request | None:
        if not self._queues:
            return None
        return self._queues[self._head_tenant()][0]

    def pop(self) -> Request:
        tenant = self._head_tenant()
        queue = self._queues[tenant]
        request = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[tenant]
            self._floor = self.counters[tenant]
        return request

    def remove(self, request: Request) -> None:
        queue = self._queues[request.tenant]
        queue.remove(request)
        self._size -= 1
        if not queue:
            del self._queues[request.tenant]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        for queue in list(self._queues.values()):
            yield from queue

    def charge(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> None:
        counters = self.counters
        inverse = self._inverse
        default = self._default_inverse
        for request, n in zip(requests, num_new_tokens, strict=True):
            tenant = request.tenant
            counters[tenant] = counters.get(tenant, 0.0) + n * inverse.get(tenant, default)


@runtime_checkable
class VictimPolicy(Protocol):
    """Which running request is preempted first when KV blocks run out (interface version 1).

    :meth:`running_rank` gives each request a sort key when it is admitted; the scheduler keeps
    its running requests sorted by it and preempts the one with the highest key first (a
    preempted request is recomputed later). The key must be comparable with every other key the
    policy returns and must not change while the request runs. Every
    :class:`SchedulingPolicy` is also a victim policy (its own ``running_rank``); give the
    scheduler another one to change the victim without changing the queue.
    """

    def running_rank(self, request: Request, admission: int) -> Any:
        """The sort key of ``request``, admitted as the ``admission``-th request (0, 1, ...)."""
        ...


class NewestVictimPolicy:
    """The request admitted last is preempted first (it has the least work to redo)."""

    def running_rank(self, request: Request, admission: int) -> Any:
        return admission


class LowestPriorityVictimPolicy:
    """The request with the highest ``priority`` value (the least urgent) is preempted first;
    among equals, the one admitted last."""

    def running_rank(self, request: Request, admission: int) -> Any:
        return (request.priority, admission)


def make_policy(policy: str | SchedulingPolicy | None) -> SchedulingPolicy:
    """A scheduling policy from a spec (``"fcfs"``, ``"priority"``, ``"fair"``, a plugin's
    name, or ``'NAME:{"json": "kwargs"}'``) or an instance; None is ``"fcfs"``.

    Names resolve through :mod:`servekit.plugins` (built-ins and entry points alike).
    """
    if policy is None:
        policy = "fcfs"
    made = plugins.resolve("policy", policy, what="policy")
    if not isinstance(made, SchedulingPolicy):
        raise plugins.PluginTypeError(
            f"policy must be a servekit.sched.SchedulingPolicy, got {type(made).__name__}"
        )
    return made


def make_victim_policy(victim: str | VictimPolicy) -> VictimPolicy:
    """A victim policy from a spec (``"newest"``, ``"lowest_priority"``, a plugin's name, or
    ``'NAME:{...}'``) or an instance."""
    made = plugins.resolve("victim_policy", victim, what="victim_policy")
    if not isinstance(made, VictimPolicy):
        raise plugins.PluginTypeError(
            f"victim_policy must have running_rank(request, admission), got {type(made).__name__}"
        )
    return made
