"""A deadline-aware scheduling policy: earliest deadline first (EDF).

A request's deadline is its own ``deadline`` (an absolute time on the scheduler's clock, set by
the caller or the server's request timeout), or, when it has none, its arrival time plus
``default_slack`` seconds, so a request without a deadline is never starved: it is served once
it is the earliest. The running requests are ranked by the same key, so under KV pressure the
request whose deadline is furthest away is preempted first.

    servekit serve --policy deadline
    servekit serve --policy 'deadline:{"default_slack": 5.0}'
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from itertools import count
from typing import Any

from servekit.sched import Request, SchedulingPolicy


class DeadlinePolicy(SchedulingPolicy):
    """Earliest deadline first; requests without one get ``arrival + default_slack``."""

    api_version = 1  # the SchedulingPolicy interface version this implements
    name = "deadline"

    def __init__(self, default_slack: float = 30.0) -> None:
        if isinstance(default_slack, bool) or not isinstance(default_slack, (int, float)) \
                or not math.isfinite(default_slack) or default_slack < 0:
            raise ValueError(f"default_slack must be a finite number >= 0, got {default_slack!r}")
        self.default_slack = float(default_slack)
        self._heap: list[tuple[float, float, int, Request]] = []
        self._serial = count()

    def deadline_of(self, request: Request) -> float:
        """The deadline the policy orders ``request`` by."""
        if request.deadline is not None:
            return request.deadline
        return request.arrival_time + self.default_slack

    def _key(self, request: Request) -> tuple[float, float, int]:
        key = request.policy_key
        if key is None:  # computed once: a request keeps its place in line when preempted
            key = request.policy_key = (
                self.deadline_of(request), request.arrival_time, next(self._serial))
        return key  # type: ignore[no-any-return]

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (*self._key(request), request))

    def push_preempted(self, request: Request) -> None:
        self.push(request)

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
